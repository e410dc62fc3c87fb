"""The CDNA3 one-byte MFMA wrappers of backends/rocm/hal_vendor.h as rocm-sim emulates them
(v_mfma_f32_32x32x16_fp8_fp8 with FNUZ e4m3 inputs, v_mfma_i32_32x32x16_i8), checked against the
lane layouts of docs/hardware.md ("AMD CDNA3 fp8 / int8 MFMA"), and the HIP quantized GEMMs
(backends/rocm/qgemm.hip) through the conformance suite on emulated gfx90a, gfx940 and gfx1030."""
import ml_dtypes
import numpy as np
import pytest

import hal
from hal import conformance
from hal.backends.gpu.vendor import ROCM

executor = pytest.importorskip("hal.backends.sim.executor")
available, reason = executor.toolchain()
pytestmark = pytest.mark.skipif(not available, reason=f"no host toolchain for the emulator: {reason}")

ROCM_DIR = ROCM.kernel_dir

# One wave computes D = A*B + C (A [32x16], B [16x32] one-byte codes; C, D [32x32]) with fragments
# built from the layout tables the test passes in, through the wrappers kernels use (hal_vendor.h).
KERNELS = r"""
#include "hal_vendor.h"

__global__ void mfma_bytes_layout_dump(int* a, int* b) {
    const int lane = threadIdx.x;
    for (int r = 0; r < 8; ++r) {
        auto p = hal_sim::mma_layout::mfma32x32x16_a(lane, r);
        a[(lane * 8 + r) * 2] = p.row, a[(lane * 8 + r) * 2 + 1] = p.col;
        auto q = hal_sim::mma_layout::mfma32x32x16_b(lane, r);
        b[(lane * 8 + r) * 2] = q.row, b[(lane * 8 + r) * 2 + 1] = q.col;
    }
}

// The wrapper by accumulator type: fp32 for fp8 inputs, int32 for int8.
__device__ void mfma_bytes(float d[16], const unsigned a[2], const unsigned b[2], const float c[16]) { mfma_f32_32x32x16_fp8(d, a, b, c); }
__device__ void mfma_bytes(int d[16], const unsigned a[2], const unsigned b[2], const int c[16]) { mfma_i32_32x32x16_i8(d, a, b, c); }

template <class Acc>
__global__ void mfma_bytes_tile(const unsigned char* a, const unsigned char* b, const Acc* c, Acc* d, const int* la, const int* lb,
                                const int* lcd) {
    const int lane = threadIdx.x;
    unsigned ra[2] = {0, 0}, rb[2] = {0, 0};
    for (int r = 0; r < 8; ++r) {
        ra[r / 4] |= unsigned(a[la[(lane * 8 + r) * 2] * 16 + la[(lane * 8 + r) * 2 + 1]]) << (8 * (r % 4));
        rb[r / 4] |= unsigned(b[lb[(lane * 8 + r) * 2] * 32 + lb[(lane * 8 + r) * 2 + 1]]) << (8 * (r % 4));
    }
    Acc rc[16], rd[16];
    for (int r = 0; r < 16; ++r) rc[r] = c[lcd[(lane * 16 + r) * 2] * 32 + lcd[(lane * 16 + r) * 2 + 1]];
    mfma_bytes(rd, ra, rb, rc);
    for (int r = 0; r < 16; ++r) d[lcd[(lane * 16 + r) * 2] * 32 + lcd[(lane * 16 + r) * 2 + 1]] = rd[r];
}
"""


@pytest.fixture(scope="module")
def bytes_mfma(tmp_path_factory):
    source = tmp_path_factory.mktemp("mfma_lowp") / "mfma_lowp.hip"
    source.write_text(KERNELS)
    return executor.SimModule(source, "rocm", ["mfma_bytes_layout_dump", "mfma_bytes_tile<float>", "mfma_bytes_tile<int>"],
                              include_dirs=(ROCM_DIR,))


def mfma_32x32x16_layout():
    """(lane, element) -> (row, col) of A [32x16], B [16x32], C/D [32x32], typed in from docs/hardware.md:
    8 elements per lane, k = 8 * (lane / 32) + r; D as the f16 32x32x8 shape."""
    lane = np.arange(64)[:, None]
    r8, r16 = np.arange(8)[None, :], np.arange(16)[None, :]
    a = np.stack(np.broadcast_arrays(lane % 32 + 0 * r8, 8 * (lane // 32) + r8), -1)
    b = np.stack(np.broadcast_arrays(8 * (lane // 32) + r8, lane % 32 + 0 * r8), -1)
    cd = np.stack(np.broadcast_arrays(8 * (r16 // 4) + 4 * (lane // 32) + r16 % 4, lane % 32 + 0 * r16), -1)
    return a, b, cd


def tables():
    return tuple(np.ascontiguousarray(t, np.int32) for t in mfma_32x32x16_layout())


def test_layout_formulas_cover_every_element_once():
    for table, shape in zip(mfma_32x32x16_layout(), [(32, 16), (16, 32), (32, 32)]):
        counts = np.zeros(shape, int)
        np.add.at(counts, (table[..., 0].ravel(), table[..., 1].ravel()), 1)
        assert (counts == 1).all()


def test_emulator_index_maps_match_the_formulas(bytes_mfma):
    want_a, want_b, _ = tables()
    got_a, got_b = np.full(want_a.shape, -1, np.int32), np.full(want_b.shape, -1, np.int32)
    bytes_mfma.launch("mfma_bytes_layout_dump", 1, 64, 0, (got_a, got_b))
    np.testing.assert_array_equal(got_a, want_a)
    np.testing.assert_array_equal(got_b, want_b)


def test_fp8_mfma_reads_fnuz_e4m3_and_computes_a_b_plus_c(bytes_mfma, rng):
    codes = np.setdiff1d(np.arange(256), [0x80]).astype(np.uint8)  # 0x80 is FNUZ's NaN
    a, b = rng.choice(codes, (32, 16)), rng.choice(codes, (16, 32))
    c = rng.standard_normal((32, 32)).astype(np.float32)
    d = np.full((32, 32), np.nan, np.float32)
    bytes_mfma.launch("mfma_bytes_tile<float>", 1, 64, 0, (a, b, c, d, *tables()))
    fa, fb = (x.view(ml_dtypes.float8_e4m3fnuz).astype(np.float64) for x in (a, b))
    # products are exact in fp32; 16 fp32 additions round at most 17 times, relative to the magnitudes
    bound = 17 * 2.0**-24 * (np.abs(fa) @ np.abs(fb) + np.abs(c))
    assert (np.abs(d - (fa @ fb + c)) <= bound).all()
    # the same bytes read as OCP e4m3fn would be twice as large (bias 7 instead of 8)
    assert not np.allclose(d, a.view(ml_dtypes.float8_e4m3fn).astype(np.float64) @ b.view(ml_dtypes.float8_e4m3fn).astype(np.float64) + c)


def test_fp8_mfma_propagates_the_fnuz_nan(bytes_mfma):
    a, b = np.full((32, 16), 0x38, np.uint8), np.full((16, 32), 0x38, np.uint8)  # 0x38 = 0.5 in e4m3fnuz
    a[5, 3] = 0x80
    d = np.zeros((32, 32), np.float32)
    bytes_mfma.launch("mfma_bytes_tile<float>", 1, 64, 0, (a, b, np.zeros((32, 32), np.float32), d, *tables()))
    assert np.isnan(d[5]).all() and not np.isnan(np.delete(d, 5, axis=0)).any()
    np.testing.assert_array_equal(np.delete(d, 5, axis=0), 16 * 0.25)


def test_int8_mfma_is_exact_int32(bytes_mfma, rng):
    a = rng.integers(-128, 128, (32, 16)).astype(np.int8)
    b = rng.integers(-128, 128, (16, 32)).astype(np.int8)
    a[0], b[:, 0] = -128, -128  # the largest product, 16 times: 2^18
    c = rng.integers(-2**31, 2**31, (32, 32), dtype=np.int64).astype(np.int32)
    c[0, 0] = 2**31 - 1  # wraps like the device's two's-complement add
    d = np.zeros((32, 32), np.int32)
    bytes_mfma.launch("mfma_bytes_tile<int>", 1, 64, 0, (a.view(np.uint8), b.view(np.uint8), c, d, *tables()))
    want = (a.astype(np.int64) @ b.astype(np.int64) + c) % 2**32
    np.testing.assert_array_equal(d.view(np.uint32), want.astype(np.uint32))


# ---- the quantized GEMMs on emulated AMD targets ----------------------------------------------------

QGEMM_OPS = ["fp8_gemm_blockscale", "fp8_grouped_gemm_blockscale", "fp8_grouped_gemm_masked_blockscale", "int8_gemm", "w4a16_gemm", "fp4_gemm"]


@pytest.mark.parametrize("arch", ["gfx90a", "gfx940", "gfx1030"])
@pytest.mark.parametrize("op", QGEMM_OPS)
def test_qgemm_conformance(sim_on, arch, op):
    name, _ = sim_on(ROCM, arch)
    results = [conformance.run(c) for c in conformance.cases(name, [op])]
    bad = [f"{r.case.id}: {r.message[:500]}" for r in results if r.status != "pass"]
    assert results and not bad, "\n".join(bad[:5])


@pytest.mark.parametrize("arch", ["gfx90a", "gfx940"])
@pytest.mark.parametrize("fmt", ["float8_e4m3fnuz", "float8_e4m3fn"])
def test_grouped_fp8_with_more_experts_than_threads(sim_on, arch, fmt, rng):
    """300 experts (the tile search scans them in two chunks of 256), many of them empty, rows
    before and after the experts (more than one zero tile), several K stages, gate/up pairs."""
    name, _ = sim_on(ROCM, arch)
    counts = rng.integers(0, 4, 300) * (rng.random(300) < 0.6)
    lead, tail, k, n = 5, 150, 330, 45
    offsets = (lead + np.concatenate([[0], np.cumsum(counts)])).astype(np.int32)
    rows = int(offsets[-1]) + tail
    a, a_scales = hal.ops.quantize(rng.standard_normal((rows, k)).astype(np.float32), fmt, "group", backend="cpu")
    b, b_scales = hal.ops.quantize(rng.standard_normal((len(counts), 2 * n, k)).astype(np.float32), fmt, "block", backend="cpu")
    args = dict(a=a, a_scales=a_scales, b=b, b_scales=b_scales, expert_offsets=offsets, activation="silu_and_mul", out_dtype="float32")
    op = hal.ops.fp8_grouped_gemm_blockscale
    with hal.use(name, fallback="error"):
        out = op(**args)
    worst, _, message = conformance.judge(op, args, (out,))
    assert worst <= 1.0, message
    assert not out[:lead].any() and not out[offsets[-1]:].any()
