"""The mma.sync m16n8k32 wrappers with 8-bit inputs (backends/cuda/hal_vendor.h) as cuda-sim emulates
them (e4m3 -> f32 and s8 -> s32), checked against the lane layouts of docs/hardware.md
("NVIDIA m16n8k32"); then the CUDA quantized GEMMs (backends/cuda/qgemm.cu) on emulated sm_75 (SIMT
only), sm_80 (f16 / s8 matrix variants), sm_89 (mma with e4m3 inputs) and sm_90a (f16 variant): every fp8 code decodes
exactly in every variant, the conformance suite passes, and each architecture runs the variant
launch_qgemm.py promises for it."""
import ml_dtypes
import numpy as np
import pytest

import hal
from hal import conformance
from hal.backends.gpu.vendor import CUDA

executor = pytest.importorskip("hal.backends.sim.executor")
available, reason = executor.toolchain()
pytestmark = pytest.mark.skipif(not available, reason=f"no host toolchain for the emulator: {reason}")

# One warp computes D = A*B + C (A [16x32], B [32x8] as [k][n], one-byte codes; C, D [16x8]) with
# fragments built from the layout tables the test passes in, through the wrappers kernels use.
KERNELS = r"""
#include "hal_vendor.h"

__global__ void mma_k32_layout_dump(int* a, int* b) {
    const int lane = threadIdx.x;
    for (int i = 0; i < 16; ++i) {
        auto p = hal_sim::mma_layout::m16n8k32_a(lane, i);
        a[(lane * 16 + i) * 2] = p.row, a[(lane * 16 + i) * 2 + 1] = p.col;
    }
    for (int i = 0; i < 8; ++i) {
        auto p = hal_sim::mma_layout::m16n8k32_b(lane, i);
        b[(lane * 8 + i) * 2] = p.row, b[(lane * 8 + i) * 2 + 1] = p.col;
    }
}

template <class Acc>
__global__ void mma_k32_tile(const unsigned char* a, const unsigned char* b, const Acc* c, Acc* d, const int* la, const int* lb, const int* lcd) {
    const int lane = threadIdx.x;
    unsigned ra[4] = {0, 0, 0, 0}, rb[2] = {0, 0};
    for (int i = 0; i < 16; ++i) ra[i >> 2] |= unsigned(a[la[(lane * 16 + i) * 2] * 32 + la[(lane * 16 + i) * 2 + 1]]) << (8 * (i & 3));
    for (int i = 0; i < 8; ++i) rb[i >> 2] |= unsigned(b[lb[(lane * 8 + i) * 2] * 8 + lb[(lane * 8 + i) * 2 + 1]]) << (8 * (i & 3));
    Acc rc[4], rd[4];
    for (int i = 0; i < 4; ++i) rc[i] = c[lcd[(lane * 4 + i) * 2] * 8 + lcd[(lane * 4 + i) * 2 + 1]];
    if constexpr (std::is_same_v<Acc, float>) mma_m16n8k32_e4m3(rd, ra, rb, rc);
    else mma_m16n8k32_s8(rd, ra, rb, rc);
    for (int i = 0; i < 4; ++i) d[lcd[(lane * 4 + i) * 2] * 8 + lcd[(lane * 4 + i) * 2 + 1]] = rd[i];
}
"""


@pytest.fixture(scope="module")
def k32(tmp_path_factory):
    source = tmp_path_factory.mktemp("mma_k32") / "mma_k32.cu"
    source.write_text(KERNELS)
    return executor.SimModule(source, "cuda", ["mma_k32_layout_dump", "mma_k32_tile<float>", "mma_k32_tile<int>"], include_dirs=(CUDA.kernel_dir,))


def m16n8k32_layout():
    """(lane, element) -> (row, col) of A [16x32], B [32x8] (k, n), C/D [16x8], typed in from
    docs/hardware.md: g = lane >> 2, t = lane & 3; A row g + 8 ((i >> 2) & 1), k 4t + (i & 3) + 16 (i >> 3);
    B k 4t + (i & 3) + 16 (i >> 2), n g; C/D as m16n8k16."""
    lane = np.arange(32)[:, None]
    g, t = lane >> 2, lane & 3
    i16, i8, i4 = np.arange(16)[None, :], np.arange(8)[None, :], np.arange(4)[None, :]
    a = np.stack(np.broadcast_arrays(g + 8 * ((i16 >> 2) & 1), 4 * t + (i16 & 3) + 16 * (i16 >> 3)), -1)
    b = np.stack(np.broadcast_arrays(4 * t + (i8 & 3) + 16 * (i8 >> 2), g + 0 * i8), -1)
    cd = np.stack(np.broadcast_arrays(g + 8 * (i4 >> 1), 2 * t + (i4 & 1)), -1)
    return a, b, cd


def tables():
    return tuple(np.ascontiguousarray(t, np.int32) for t in m16n8k32_layout())


def test_layout_formulas_cover_every_element_once():
    for table, shape in zip(m16n8k32_layout(), [(16, 32), (32, 8), (16, 8)]):
        counts = np.zeros(shape, int)
        np.add.at(counts, (table[..., 0].ravel(), table[..., 1].ravel()), 1)
        assert (counts == 1).all()


def test_a_and_b_registers_are_words_of_k_contiguous_rows():
    """What qgemm.cu relies on: A register j holds 4 consecutive k of one row (row g + 8 (j & 1), k
    from 4t + 16 (j >> 1)); B register j 4 consecutive k of weight row g (k from 4t + 16 j)."""
    a, b, _ = m16n8k32_layout()
    lane = np.arange(32)
    g, t = lane >> 2, lane & 3
    for j in range(4):
        np.testing.assert_array_equal(a[:, 4 * j: 4 * j + 4, 0], np.repeat((g + 8 * (j & 1))[:, None], 4, 1))
        np.testing.assert_array_equal(a[:, 4 * j: 4 * j + 4, 1], (4 * t + 16 * (j >> 1))[:, None] + np.arange(4))
    for j in range(2):
        np.testing.assert_array_equal(b[:, 4 * j: 4 * j + 4, 0], (4 * t + 16 * j)[:, None] + np.arange(4))
        np.testing.assert_array_equal(b[:, 4 * j: 4 * j + 4, 1], np.repeat(g[:, None], 4, 1))


def test_emulator_index_maps_match_the_formulas(k32):
    want_a, want_b, _ = tables()
    got_a, got_b = np.full(want_a.shape, -1, np.int32), np.full(want_b.shape, -1, np.int32)
    k32.launch("mma_k32_layout_dump", 1, 32, 0, (got_a, got_b))
    np.testing.assert_array_equal(got_a, want_a)
    np.testing.assert_array_equal(got_b, want_b)


def test_e4m3_mma_reads_ocp_e4m3fn_and_computes_a_b_plus_c(k32, rng):
    codes = np.setdiff1d(np.arange(256), [0x7F, 0xFF]).astype(np.uint8)  # every finite code, subnormals included
    a, b = rng.choice(codes, (16, 32)), rng.choice(codes, (32, 8))
    c = rng.standard_normal((16, 8)).astype(np.float32)
    d = np.full((16, 8), np.nan, np.float32)
    k32.launch("mma_k32_tile<float>", 1, 32, 0, (a, b, c, d, *tables()))
    fa, fb = (x.view(ml_dtypes.float8_e4m3fn).astype(np.float64) for x in (a, b))
    # products are exact in fp32; 32 fp32 additions round at most 33 times, relative to the magnitudes
    bound = 33 * 2.0**-24 * (np.abs(fa) @ np.abs(fb) + np.abs(c))
    assert (np.abs(d - (fa @ fb + c)) <= bound).all()


def test_e4m3_mma_propagates_nan(k32):
    a, b = np.full((16, 32), 0x30, np.uint8), np.full((32, 8), 0x30, np.uint8)  # 0x30 = 0.5 in e4m3fn
    a[3, 7] = 0x7F
    d = np.zeros((16, 8), np.float32)
    k32.launch("mma_k32_tile<float>", 1, 32, 0, (a, b, np.zeros((16, 8), np.float32), d, *tables()))
    assert np.isnan(d[3]).all() and not np.isnan(np.delete(d, 3, axis=0)).any()
    np.testing.assert_array_equal(np.delete(d, 3, axis=0), 32 * 0.25)


def test_s8_mma_is_exact_int32(k32, rng):
    a = rng.integers(-128, 128, (16, 32)).astype(np.int8)
    b = rng.integers(-128, 128, (32, 8)).astype(np.int8)
    a[0], b[:, 0] = -128, -128  # the largest product, 32 times: 2^19
    c = rng.integers(-2**31, 2**31, (16, 8), dtype=np.int64).astype(np.int32)
    c[0, 0] = 2**31 - 1  # wraps like the device's two's-complement add
    d = np.zeros((16, 8), np.int32)
    k32.launch("mma_k32_tile<int>", 1, 32, 0, (a.view(np.uint8), b.view(np.uint8), c, d, *tables()))
    want = (a.astype(np.int64) @ b.astype(np.int64) + c) % 2**32
    np.testing.assert_array_equal(d.view(np.uint32), want.astype(np.uint32))


# ---- the quantized GEMMs on emulated NVIDIA architectures -------------------------------------------

QGEMM_OPS = ["fp8_gemm_blockscale", "fp8_grouped_gemm_blockscale", "fp8_grouped_gemm_masked_blockscale", "int8_gemm", "w4a16_gemm", "fp4_gemm"]
ARCHS = ["sm_75", "sm_80", "sm_89", "sm_90a"]


def _code_matrices(fmt):
    """a [256, 130]: row i holds fp8 code i at k = 0 and k = 129 (the second K block), 0 elsewhere;
    b [3, 130]: 1 at k = 0 in row 0, 1 at k = 129 in row 1, -2 at k = 129 in row 2. Then out[i] =
    (v, v, -2 v) for v = decode(i), exactly, whatever order a kernel sums in."""
    dtype = ml_dtypes.float8_e4m3fn if fmt == "float8_e4m3fn" else ml_dtypes.float8_e4m3fnuz
    codes = np.arange(256, dtype=np.uint8).view(dtype)
    a = np.zeros((256, 130), dtype)
    a[:, 0] = a[:, 129] = codes
    b = np.zeros((3, 130), dtype)
    b[0, 0] = b[1, 129] = 1.0
    b[2, 129] = -2.0
    v = codes.astype(np.float32)
    return a, b, np.stack([v, v, -2 * v], 1)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "float8_e4m3fnuz"])
def test_every_fp8_code_decodes_exactly(sim_on, arch, fmt):
    """The f16 variant moves fp8 fields into f16 fields (the value times 2^-8 / 2^-7, undone by the
    promotion), the native one reads e4m3fn bytes, SIMT decodes to fp32: each must give the exact
    values, subnormals and NaN included."""
    name, _ = sim_on(CUDA, arch)
    a, b, want = _code_matrices(fmt)
    out = hal.ops.fp8_gemm_blockscale(a, np.ones((256, 2), np.float32), b, np.ones((1, 2), np.float32), out_dtype="float32", backend=name)
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(out), nan)
    np.testing.assert_array_equal(out[~nan], want[~nan])


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("op", QGEMM_OPS)
def test_qgemm_conformance(sim_on, arch, op):
    name, _ = sim_on(CUDA, arch)
    results = [conformance.run(c) for c in conformance.cases(name, [op])]
    bad = [f"{r.case.id}: {r.message[:500]}" for r in results if r.status != "pass"]
    assert results and not bad, "\n".join(bad[:5])


# What launch_qgemm.py runs per architecture: no matrix units -> SIMT; sm_80 -> the f16 / s8 mma
# variants; sm_89 -> mma with e4m3 inputs for e4m3fn (e4m3fnuz, which NVIDIA hardware does not
# read, stays on the f16 variant); sm_90a: the f16 variant (its mma.sync e4m3 is not native).
EXPECTED = {
    "sm_75": {"fp8_gemm_simt", "int8_gemm_simt", "w4a16_gemm_simt", "fp4_gemm_simt"},
    "sm_80": {"fp8_gemm_mma", "int8_gemm_mma", "w4a16_gemm_mma", "w4a16_gemm_simt", "fp4_gemm_mma", "fp4_gemm_simt"},
    "sm_89": {"fp8_gemm_mma_fp8", "fp8_gemm_mma", "int8_gemm_mma", "w4a16_gemm_mma", "w4a16_gemm_simt", "fp4_gemm_mma", "fp4_gemm_simt"},
    "sm_90a": {"fp8_gemm_mma", "int8_gemm_mma", "w4a16_gemm_mma", "w4a16_gemm_simt", "fp4_gemm_mma", "fp4_gemm_simt"},
}


@pytest.mark.parametrize("arch", ARCHS)
def test_each_architecture_runs_its_variants(sim_on, arch):
    name, launched = sim_on(CUDA, arch)
    launched.clear()
    for case in conformance.cases(name, QGEMM_OPS):
        if case.kind != "error":
            conformance.run(case)
    assert launched == EXPECTED[arch]
