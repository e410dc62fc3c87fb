"""The host emulator's numerics: half / bfloat16 / fp8 conversions are bit-exact round to nearest
even (checked against NumPy and ml_dtypes on millions of random bit patterns and on every rounding
boundary), and the mma.sync / MFMA wrappers follow the lane layouts of docs/hardware.md."""
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest

executor = pytest.importorskip("hal.backends.sim.executor")
available, reason = executor.toolchain()
pytestmark = pytest.mark.skipif(not available, reason=f"no host toolchain for the emulator: {reason}")

KERNELS = Path(__file__).parent / "sim_kernels"


@pytest.fixture(scope="module")
def cuda_numerics():
    return executor.SimModule(KERNELS / "numerics.cu", "cuda",
                              ["encode", "decode", "encode_fp8", "decode_fp8", "mma_layout_dump", "mma_tile<__half>", "mma_tile<__nv_bfloat16>"])


@pytest.fixture(scope="module")
def rocm_numerics():
    return executor.SimModule(KERNELS / "numerics.hip", "rocm", ["encode", "decode", "mfma_layout_dump", "mfma_tile<__half>", "mfma_tile<hip_bfloat16>"])


def bits_to_f32(bits):
    return np.asarray(bits, np.uint32).view(np.float32)


def conversion_inputs(rng):
    """Random bit patterns (every class of float32: NaN, inf, subnormal, ...) and, for half and
    bfloat16, every midpoint between neighbours and the floats one ulp either side of it."""
    random = rng.integers(0, 2**32, 1 << 22, dtype=np.uint64).astype(np.uint32)
    k = np.arange(1 << 16, dtype=np.uint32)
    bf16_edges = np.concatenate([(k << 16) | 0x7FFF, (k << 16) | 0x8000, (k << 16) | 0x8001])
    halves = np.arange(0, 0x7C00, dtype=np.uint16).view(np.float16).astype(np.float64)  # finite, >= 0
    mids = ((halves[:-1] + halves[1:]) / 2).astype(np.float32)  # exact in float32
    mids = np.concatenate([mids, [np.float32(65520.0)]])  # the midpoint between the max half and "65536"
    up, down = np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(0))
    half_edges = np.concatenate([mids, up, down]).view(np.uint32)
    half_edges = np.concatenate([half_edges, half_edges | 0x80000000])
    specials = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC00001, 0x7F800001, 0x33000000, 0x33000001, 0x387FC000,
                         0x477FE000, 0x477FEFFF, 0x477FF000, 0x00000001, 0x807FFFFF, 0x7F7FFFFF, 0x7F7F8000], np.uint32)
    return np.concatenate([random, bf16_edges, half_edges, specials])


@pytest.mark.parametrize("vendor", ["cuda", "rocm"])
def test_half_and_bfloat16_encoding_is_bit_exact(vendor, cuda_numerics, rocm_numerics, rng):
    module = cuda_numerics if vendor == "cuda" else rocm_numerics
    bits = conversion_inputs(rng)
    x = bits_to_f32(bits)
    h, b = np.zeros(x.size, np.uint16), np.zeros(x.size, np.uint16)
    module.launch("encode", 64, 256, 0, (x, h, b, np.int64(x.size)))
    nan = np.isnan(x)
    with np.errstate(over="ignore", invalid="ignore"):
        want_h = x.astype(np.float16).view(np.uint16)
        want_b = x.astype(ml_dtypes.bfloat16).view(np.uint16)
    np.testing.assert_array_equal(h[~nan], want_h[~nan])
    np.testing.assert_array_equal(b[~nan], want_b[~nan])
    # NaN codes as the vendors' instructions produce them
    if vendor == "cuda":  # cvt.rn.{f16,bf16}.f32: the canonical NaN
        assert (h[nan] == 0x7FFF).all() and (b[nan] == 0x7FFF).all()
    else:  # v_cvt_f16_f32 keeps sign and payload top bits, quieted; hip_bfloat16 truncates and sets bit 0
        nb = bits[nan]
        np.testing.assert_array_equal(h[nan], ((nb >> 16) & 0x8000) | 0x7E00 | ((nb >> 13) & 0x3FF))
        np.testing.assert_array_equal(b[nan], (nb >> 16) | 1)


@pytest.mark.parametrize("vendor", ["cuda", "rocm"])
def test_half_and_bfloat16_decoding_is_exact(vendor, cuda_numerics, rocm_numerics):
    module = cuda_numerics if vendor == "cuda" else rocm_numerics
    codes = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    h, b = codes.view(np.float16), codes.view(ml_dtypes.bfloat16)
    fh, fb = np.zeros(codes.size, np.float32), np.zeros(codes.size, np.float32)
    module.launch("decode", 64, 256, 0, (h, b, fh, fb, np.int32(codes.size)))
    np.testing.assert_array_equal(fh.view(np.uint32), h.astype(np.float32).view(np.uint32))
    np.testing.assert_array_equal(fb.view(np.uint32), codes.astype(np.uint32) << 16)


FP8 = [ml_dtypes.float8_e4m3fn, ml_dtypes.float8_e5m2, ml_dtypes.float8_e4m3fnuz, ml_dtypes.float8_e5m2fnuz]


def test_fp8_decoding(cuda_numerics):
    out = np.zeros(256 * 4, np.float32)
    cuda_numerics.launch("decode_fp8", 1, 256, 0, (out,))
    got = out.reshape(256, 4)
    codes = np.arange(256, dtype=np.uint8)
    for column, dtype in enumerate(FP8):
        want = codes.view(dtype).astype(np.float32)
        np.testing.assert_array_equal(np.isnan(got[:, column]), np.isnan(want))
        ok = ~np.isnan(want)
        np.testing.assert_array_equal(got[ok, column].view(np.uint32), want[ok].view(np.uint32))


def test_fp8_encoding_rounds_to_nearest_even_then_saturates(cuda_numerics, rng):
    codes = np.arange(256, dtype=np.uint8)
    pieces = [rng.standard_normal(1 << 20).astype(np.float32) * np.exp2(rng.integers(-24, 18, 1 << 20)).astype(np.float32),
              bits_to_f32(rng.integers(0, 2**32, 1 << 18, dtype=np.uint64).astype(np.uint32)),
              np.array([448, 464, 465, 480, 240, 248, 57344, 61440, 61441, np.inf, -np.inf, np.nan, -0.0, 0.0, 2.0**-9, 2.0**-10, 2.0**-17], np.float32)]
    for dtype in FP8:  # every midpoint between neighbouring codes, and one ulp either side
        values = np.unique(codes.view(dtype).astype(np.float64)[~np.isnan(codes.view(dtype).astype(np.float64))])
        mids = ((values[:-1] + values[1:]) / 2).astype(np.float32)
        pieces += [mids, np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf))]
    x = np.concatenate(pieces)
    out = np.zeros(8 * x.size, np.uint8)
    cuda_numerics.launch("encode_fp8", 64, 256, 0, (x, out, np.int64(x.size)))
    got = out.reshape(-1, 8)
    for column, dtype in enumerate(FP8):
        table = codes.view(dtype).astype(np.float32)
        finite = table[np.isfinite(table)]
        max_finite = finite.max()
        with np.errstate(over="ignore", invalid="ignore"):
            plain = x.astype(dtype).astype(np.float32)  # ml_dtypes: overflow -> inf or NaN
        sat, nosat = table[got[:, 2 * column]], table[got[:, 2 * column + 1]]
        nan = np.isnan(plain)
        np.testing.assert_array_equal(np.isnan(nosat), nan, err_msg=f"{dtype.__name__} NaN")
        np.testing.assert_array_equal(nosat[~nan], plain[~nan], err_msg=dtype.__name__)
        # saturating: out-of-range values (inf included) become +-max; NaN stays NaN
        with np.errstate(invalid="ignore"):
            want = np.where(np.isnan(x), np.nan, np.where(np.isfinite(plain), plain, np.sign(x) * max_finite)).astype(np.float32)
        np.testing.assert_array_equal(np.isnan(sat), np.isnan(want))
        ok = ~np.isnan(want)
        np.testing.assert_array_equal(sat[ok], want[ok], err_msg=f"{dtype.__name__} saturating")
        if "fnuz" in dtype.__name__:  # no negative zero
            assert not (got[:, 2 * column] == 0x80)[~np.isnan(x)].any()
    # the edge where libraries disagree (docs/hardware.md): 464 ties to even 448; 465 overflows
    e4m3 = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    at = {v: int(np.flatnonzero(x == np.float32(v))[0]) for v in (464.0, 465.0)}
    assert e4m3[got[at[464.0], 0]] == 448 and e4m3[got[at[464.0], 1]] == 448
    assert e4m3[got[at[465.0], 0]] == 448 and np.isnan(e4m3[got[at[465.0], 1]])


# ---- matrix units: the lane layouts of docs/hardware.md ---------------------------------------------------

def m16n8k16_layout():
    """(lane, element) -> (row, col) of A, B, C/D, typed in from docs/hardware.md."""
    lane = np.arange(32)[:, None]
    g, t = lane >> 2, lane & 3
    i8, i4 = np.arange(8)[None, :], np.arange(4)[None, :]
    a = np.stack(np.broadcast_arrays(g + 8 * ((i8 >> 1) & 1), 2 * t + (i8 & 1) + 8 * (i8 >> 2)), -1)
    b = np.stack(np.broadcast_arrays(2 * t + (i4 & 1) + 8 * (i4 >> 1), g + 0 * i4), -1)
    cd = np.stack(np.broadcast_arrays(g + 8 * (i4 >> 1), 2 * t + (i4 & 1)), -1)
    return a, b, cd


def mfma_32x32x8_layout():
    lane = np.arange(64)[:, None]
    r4, r16 = np.arange(4)[None, :], np.arange(16)[None, :]
    a = np.stack(np.broadcast_arrays(lane % 32 + 0 * r4, 4 * (lane // 32) + r4), -1)
    b = np.stack(np.broadcast_arrays(4 * (lane // 32) + r4, lane % 32 + 0 * r4), -1)
    cd = np.stack(np.broadcast_arrays(8 * (r16 // 4) + 4 * (lane // 32) + r16 % 4, lane % 32 + 0 * r16), -1)
    return a, b, cd


@pytest.mark.parametrize("layout,shapes", [(m16n8k16_layout, [(16, 16), (16, 8), (16, 8)]), (mfma_32x32x8_layout, [(32, 8), (8, 32), (32, 32)])])
def test_layout_formulas_cover_every_element_once(layout, shapes):
    for table, shape in zip(layout(), shapes):
        counts = np.zeros(shape, int)
        np.add.at(counts, (table[..., 0].ravel(), table[..., 1].ravel()), 1)
        assert (counts == 1).all()


def test_emulator_index_maps_match_the_formulas(cuda_numerics, rocm_numerics):
    for module, kernel, layout, lanes in ((cuda_numerics, "mma_layout_dump", m16n8k16_layout, 32), (rocm_numerics, "mfma_layout_dump", mfma_32x32x8_layout, 64)):
        want = layout()
        got = [np.full(w.shape, -1, np.int32) for w in want]
        module.launch(kernel, 1, lanes, 0, tuple(got))
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("dtype,kernel", [(np.float16, "mma_tile<__half>"), (ml_dtypes.bfloat16, "mma_tile<__nv_bfloat16>")])
def test_mma_m16n8k16_computes_a_b_plus_c(cuda_numerics, rng, dtype, kernel):
    a = rng.standard_normal((16, 16)).astype(dtype)
    b = rng.standard_normal((16, 8)).astype(dtype)
    c = rng.standard_normal((16, 8)).astype(np.float32)
    d = np.full((16, 8), np.nan, np.float32)
    la, lb, lcd = (t.astype(np.int32) for t in m16n8k16_layout())
    cuda_numerics.launch(kernel, 1, 32, 0, (a, b, c, d, la, lb, lcd))
    np.testing.assert_allclose(d, a.astype(np.float64) @ b.astype(np.float64) + c, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype,kernel", [(np.float16, "mfma_tile<__half>"), (ml_dtypes.bfloat16, "mfma_tile<hip_bfloat16>")])
def test_mfma_32x32x8_computes_a_b_plus_c(rocm_numerics, rng, dtype, kernel):
    a = rng.standard_normal((32, 8)).astype(dtype)
    b = rng.standard_normal((8, 32)).astype(dtype)
    c = rng.standard_normal((32, 32)).astype(np.float32)
    d = np.full((32, 32), np.nan, np.float32)
    la, lb, lcd = (t.astype(np.int32) for t in mfma_32x32x8_layout())
    rocm_numerics.launch(kernel, 1, 64, 0, (a, b, c, d, la, lb, lcd))
    np.testing.assert_allclose(d, a.astype(np.float64) @ b.astype(np.float64) + c, rtol=1e-5, atol=1e-5)


def test_matrix_wrappers_need_the_whole_warp(cuda_numerics, rng):
    from hal.errors import KernelLaunchError

    a, b = rng.standard_normal((16, 16)).astype(np.float16), rng.standard_normal((16, 8)).astype(np.float16)
    la, lb, lcd = (t.astype(np.int32) for t in m16n8k16_layout())
    with pytest.raises(KernelLaunchError, match="mma_m16n8k16_f16.*do not exist"):
        cuda_numerics.launch("mma_tile<__half>", 1, 16, 0, (a, b, np.zeros((16, 8), np.float32), np.zeros((16, 8), np.float32), la, lb, lcd))
