"""Format-boundary tests: every rounding, saturation and special-value boundary of the low-precision
formats, through hal.formats.encode (the reference), the CPU kernels' bit-level encoder, and
hal.ops.quantize / dequantize on every registered backend that has them; plus ml_dtypes casts of the
same values as an independent check, with hal's documented departures from them asserted."""
import math

import ml_dtypes
import numpy as np
import pytest

import hal
from hal import formats as F
from hal.backends.cpu import quant as cpu_quant
from hal.registry import registry

NAN = math.nan
INF = math.inf

# (format, input, expected code, what ml_dtypes gives instead: None = the same code; "nan"/"inf": that value)
BOUNDARIES = [
    # float8_e4m3fn: max 448 = 0x7E, no inf, NaN 0x7F / 0xFF, subnormal step 2^-9
    ("float8_e4m3fn", 448.0, 0x7E, None),
    ("float8_e4m3fn", 464.0, 0x7E, None),  # the midpoint to "480" (the NaN code) ties to even 448
    ("float8_e4m3fn", 465.0, 0x7E, "nan"),  # beyond the midpoint: hal saturates, ml_dtypes overflows
    ("float8_e4m3fn", 1e30, 0x7E, "nan"),
    ("float8_e4m3fn", INF, 0x7E, "nan"),
    ("float8_e4m3fn", -INF, 0xFE, "nan"),
    ("float8_e4m3fn", -465.0, 0xFE, "nan"),
    ("float8_e4m3fn", NAN, 0x7F, None),
    ("float8_e4m3fn", -0.0, 0x80, None),
    ("float8_e4m3fn", 432.0, 0x7E, None),  # tie between 416 (odd) and 448
    ("float8_e4m3fn", 2.0**-6, 0x08, None),  # smallest normal
    ("float8_e4m3fn", 2.0**-9, 0x01, None),  # smallest subnormal
    ("float8_e4m3fn", 2.0**-10, 0x00, None),  # half of it ties to 0
    ("float8_e4m3fn", -(2.0**-10), 0x80, None),  # ... keeping the sign
    ("float8_e4m3fn", 2.0**-10 + 2.0**-20, 0x01, None),
    ("float8_e4m3fn", 3 * 2.0**-10, 0x02, None),  # 1.5 steps ties to 2 steps = 2^-8
    ("float8_e4m3fn", 7 * 2.0**-10, 0x04, None),  # 3.5 steps ties to 4
    ("float8_e4m3fn", 15 * 2.0**-10, 0x08, None),  # 7.5 steps rounds up into the smallest normal
    ("float8_e4m3fn", 1.0 + 2.0**-4, 0x38, None),  # ties to 1.0
    ("float8_e4m3fn", 1.0 + 3 * 2.0**-4, 0x3A, None),  # ties to 1.25
    # float8_e4m3fnuz (MI300): bias 8, max 240, NaN only 0x80, no -0
    ("float8_e4m3fnuz", 240.0, 0x7F, None),
    ("float8_e4m3fnuz", 248.0, 0x7F, "nan"),  # the midpoint to 256 ties to even = overflow in ml_dtypes
    ("float8_e4m3fnuz", 247.0, 0x7F, None),
    ("float8_e4m3fnuz", INF, 0x7F, "nan"),
    ("float8_e4m3fnuz", -INF, 0xFF, "nan"),
    ("float8_e4m3fnuz", -0.0, 0x00, None),
    ("float8_e4m3fnuz", -(2.0**-11), 0x00, None),  # rounds to zero: +0, the format has no -0
    ("float8_e4m3fnuz", NAN, 0x80, None),
    ("float8_e4m3fnuz", 2.0**-10, 0x01, None),
    ("float8_e4m3fnuz", 3 * 2.0**-11, 0x02, None),
    ("float8_e4m3fnuz", 232.0, 0x7E, None),  # tie between 224 and 240 (odd)
    # float8_e5m2: max 57344 = 0x7B, inf 0x7C
    ("float8_e5m2", 57344.0, 0x7B, None),
    ("float8_e5m2", 61439.0, 0x7B, None),
    ("float8_e5m2", 61440.0, 0x7B, "inf"),  # the midpoint to "65536" ties to even = inf in ml_dtypes
    ("float8_e5m2", INF, 0x7B, "inf"),
    ("float8_e5m2", -INF, 0xFB, "inf"),
    ("float8_e5m2", NAN, 0x7D, "nan"),  # any NaN code (ml_dtypes writes 0x7E)
    ("float8_e5m2", -0.0, 0x80, None),
    ("float8_e5m2", 2.0**-16, 0x01, None),
    ("float8_e5m2", 2.0**-17, 0x00, None),
    ("float8_e5m2", 3 * 2.0**-17, 0x02, None),
    ("float8_e5m2", 1.125, 0x3C, None),  # ties to 1.0
    ("float8_e5m2", 53248.0, 0x7A, None),  # tie between 49152 and 57344 (odd)
    # E2M1 (the elements of mxfp4 / nvfp4): 0, 0.5, 1, 1.5, 2, 3, 4, 6
    ("e2m1", 6.0, 0x7, None),
    ("e2m1", 5.0, 0x6, None),  # tie between 4 and 6: even code = 4
    ("e2m1", 7.0, 0x7, None),  # ml_dtypes saturates E2M1 too
    ("e2m1", 1e9, 0x7, None),
    ("e2m1", INF, 0x7, None),
    ("e2m1", -INF, 0xF, None),
    ("e2m1", -7.0, 0xF, None),
    ("e2m1", 0.25, 0x0, None),  # tie between 0 and 0.5
    ("e2m1", 0.75, 0x2, None),  # tie between 0.5 and 1
    ("e2m1", 1.25, 0x2, None),
    ("e2m1", 1.75, 0x4, None),
    ("e2m1", 2.5, 0x4, None),
    ("e2m1", 3.5, 0x6, None),
    ("e2m1", -0.0, 0x8, None),
    ("e2m1", NAN, 0x0, "-0"),  # no NaN: +0 (the block scale carries the NaN); ml_dtypes gives -0
    # integers: rint half to even, then clamp; NaN -> 0
    ("int8", 0.5, 0, None), ("int8", 1.5, 2, None), ("int8", 2.5, 2, None), ("int8", -2.5, -2, None),
    ("int8", 127.5, 127, None), ("int8", 200.0, 127, None), ("int8", -128.5, -128, None), ("int8", -1e9, -128, None),
    ("int8", INF, 127, None), ("int8", -INF, -128, None), ("int8", NAN, 0, None), ("int8", -0.0, 0, None),
    ("int4", 6.5, 6, None), ("int4", 7.5, 7, None), ("int4", -7.5, 0x8, None), ("int4", -8.5, 0x8, None),
    ("int4", -1.0, 0xF, None), ("int4", 2.5, 2, None), ("int4", NAN, 0, None), ("int4", INF, 7, None),
    ("uint4", 7.5, 8, None), ("uint4", 15.5, 15, None), ("uint4", -1.0, 0, None), ("uint4", 0.5, 0, None),
]

ML_DTYPES = {"float8_e4m3fn": ml_dtypes.float8_e4m3fn, "float8_e4m3fnuz": ml_dtypes.float8_e4m3fnuz,
             "float8_e5m2": ml_dtypes.float8_e5m2, "e2m1": ml_dtypes.float4_e2m1fn}


def _ids(rows):
    return [f"{fmt}:{x!r}" for fmt, x, *_ in rows]


def _is_nan_code(code, fmt):
    return F.FORMATS[fmt].is_float and np.isnan(F.decode(np.uint8(code), fmt))


@pytest.mark.parametrize("fmt, x, code, ml", BOUNDARIES, ids=_ids(BOUNDARIES))
def test_reference_encode(fmt, x, code, ml):
    got = F.encode(np.array([x]), fmt)[0]
    assert int(got) == code or (_is_nan_code(code, fmt) and _is_nan_code(got, fmt))


@pytest.mark.parametrize("fmt, x, code, ml", BOUNDARIES, ids=_ids(BOUNDARIES))
def test_cpu_kernel_encoder(fmt, x, code, ml):
    got = cpu_quant.encode(np.array([x], np.float32), fmt)[0]
    assert int(got) == code or (_is_nan_code(code, fmt) and _is_nan_code(got, fmt))


FLOAT_BOUNDARIES = [row for row in BOUNDARIES if row[0] in ML_DTYPES]


@pytest.mark.parametrize("fmt, x, code, ml", FLOAT_BOUNDARIES, ids=_ids(FLOAT_BOUNDARIES))
def test_ml_dtypes_agrees_or_differs_as_documented(fmt, x, code, ml):
    with np.errstate(over="ignore", invalid="ignore"):
        cast = np.array([x], np.float32).astype(ML_DTYPES[fmt])
    value = float(cast.astype(np.float64)[0])
    if ml is None:
        assert int(cast.view(np.uint8)[0]) == code
    elif ml == "nan":
        assert math.isnan(value)
    elif ml == "inf":
        assert math.isinf(value) and math.copysign(1, value) == math.copysign(1, x)
    else:  # "-0"
        assert int(cast.view(np.uint8)[0]) == 0x8


def _rounding_inputs(rng):
    """float32 values at and around every rounding boundary of the 8- and 4-bit formats: each
    combination of sign, exponent and top 4 mantissa bits, with the 19 low bits that make a tie,
    just above or below one, or random; plus random bit patterns (NaN, inf, subnormals included)."""
    high = np.arange(1 << 13, dtype=np.uint32) << 19
    low = np.array([0, 1, 0x3FFFF, 0x40000, 0x40001, 0x7FFFF, 0x20000, 0x1FFFF, 0x20001], np.uint32)
    bits = (high[:, None] | low[None, :]).ravel()
    bits = np.concatenate([bits, high | rng.integers(0, 1 << 19, high.size, dtype=np.uint32),
                           rng.integers(0, 2**32, 1 << 18, dtype=np.uint64).astype(np.uint32)])
    return bits.view(np.float32)


@pytest.mark.parametrize("fmt", list(ML_DTYPES) + ["int8", "int4", "uint4"])
def test_cpu_encoder_matches_reference_everywhere(fmt, rng):
    x = _rounding_inputs(rng)
    with np.errstate(invalid="ignore"):  # widening signalling NaNs
        np.testing.assert_array_equal(cpu_quant.encode(x, fmt), F.encode(x, fmt))


@pytest.mark.parametrize("fmt", list(ML_DTYPES))
def test_reference_matches_ml_dtypes_where_conventions_agree(fmt, rng):
    """Equal codes wherever ml_dtypes gives a finite number; where it overflows (NaN or inf), the
    input lies at or beyond the midpoint above max and hal gives +-max; NaN stays NaN (fp4: +0)."""
    x = _rounding_inputs(rng)
    with np.errstate(over="ignore", invalid="ignore"):
        ours = F.encode(x, fmt)
        cast = x.astype(ML_DTYPES[fmt])
    theirs = cast.view(np.uint8)
    values = cast.astype(np.float64)
    nan_in = np.isnan(x)
    finite = np.isfinite(values) & ~nan_in
    np.testing.assert_array_equal(ours[finite], theirs[finite])
    f = F.FORMATS[fmt]
    overflow = ~np.isfinite(values) & ~nan_in
    top = F.encode(np.array([f.max]), fmt)[0]
    expected = np.where(np.signbit(x[overflow]), top | f.sign_bit, top)
    np.testing.assert_array_equal(ours[overflow], expected)
    codes = np.arange(1 << f.bits, dtype=np.uint8)
    grid = F.decode(codes, fmt)
    next_up = 2 * f.max - grid[(grid < f.max) & np.isfinite(grid)].max()  # the value one step above max
    assert (np.abs(x[overflow]) >= (f.max + next_up) / 2).all()
    if fmt == "e2m1":
        assert (ours[nan_in] == 0).all()
    else:
        assert np.isnan(F.decode(ours[nan_in], fmt)).all()


def test_decode_matches_ml_dtypes():
    for fmt, t in ML_DTYPES.items():
        codes = np.arange(1 << F.FORMATS[fmt].bits, dtype=np.uint8)
        np.testing.assert_array_equal(F.decode(codes, fmt), codes.view(t).astype(np.float64))


# ---------------------------------------------------------------- through the ops, on every backend


def _backends(op):
    names = []
    for name in ("cpu", "cuda-sim", "rocm-sim"):
        has = bool(registry().kernels.get((op, name)))
        try:
            available = registry().entry(name).status[0]
        except hal.errors.BackendUnavailable:
            available = False
        names.append(pytest.param(name, marks=pytest.mark.skipif(not (has and available), reason=f"{name} is unavailable or has no {op} kernel")))
    return names


def _on(backend, op, *args, **kwargs):
    with hal.use(backend, fallback="error"):
        return op(*args, **kwargs)


def _element(fmt):
    return "e2m1" if fmt == "mxfp4" else fmt


def _in_range(fmt):
    """(x [1, n] float32 whose amax pins the per-tensor scale to exactly 1, its expected codes): the
    format's max and every boundary value of BOUNDARIES within range."""
    f = F.FORMATS[_element(fmt)]
    values = [x for g, x, _, _ in BOUNDARIES if g == _element(fmt) and math.isfinite(x) and abs(x) <= f.max]
    top = 7.0 if fmt == "mxfp4" else f.max  # mxfp4: amax 7 still gives exponent 0, and 7 saturates to 6
    x = np.array([[top, -f.max] + values + ([0.0] if len(values) % 2 else [])], np.float32)
    return x, F.encode(x, _element(fmt))


SCALE_ONE = ["float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2", "int8", "int4", "mxfp4"]


@pytest.mark.parametrize("backend", _backends("quantize"))
@pytest.mark.parametrize("fmt", SCALE_ONE)
def test_quantize_boundaries_at_scale_one(backend, fmt):
    x, codes = _in_range(fmt)
    q, scales = _on(backend, hal.ops.quantize, x, fmt, None if fmt == "mxfp4" else "tensor")
    if fmt == "mxfp4":
        assert int(np.asarray(scales).ravel()[0]) == 127  # E8M0 code of 2^0
        got = F.unpack_nibbles(np.asarray(q))
    else:
        assert float(np.asarray(scales).ravel()[0]) == 1.0
        got = F.unpack_nibbles(np.asarray(q)) if fmt == "int4" else np.asarray(q).view(np.uint8 if fmt != "int8" else np.int8)
    np.testing.assert_array_equal(got, codes)


@pytest.mark.parametrize("backend", _backends("quantize"))
def test_nvfp4_boundaries_at_scale_one(backend):
    """2688 = 448 * 6 sets the tensor scale to 1; a group of amax 6 then has block scale 1."""
    values = np.array([6, -6, 5, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, -0.0, 0.5, 1, 1.5, 2, 3, 4], np.float32)
    x = np.concatenate([values, np.full(16, 2688.0, np.float32)])[None, :]
    q, block, tensor_scale = _on(backend, hal.ops.quantize, x, "nvfp4")
    assert float(np.asarray(tensor_scale).ravel()[0]) == 1.0
    np.testing.assert_array_equal(np.asarray(block).astype(np.float64).ravel(), [1.0, 448.0])
    np.testing.assert_array_equal(F.unpack_nibbles(np.asarray(q))[0, :16], F.encode(values, "e2m1"))


@pytest.mark.parametrize("backend", _backends("quantize"))
@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2"])
def test_quantize_nan_group(backend, fmt):
    """A NaN makes its group's scale NaN and so every code of the group NaN; other groups are untouched."""
    x = np.linspace(-3, 3, 64, dtype=np.float32)[None, :].repeat(2, 0)
    x[0, 5] = np.nan
    q, scales = _on(backend, hal.ops.quantize, x, fmt, "row")
    assert np.isnan(np.asarray(scales)[0, 0]) and np.asarray(scales)[1, 0] == np.float32(3.0) / np.float32(F.FORMATS[fmt].max)
    values = np.asarray(q).astype(np.float64)
    assert np.isnan(values[0]).all() and not np.isnan(values[1]).any()


@pytest.mark.parametrize("backend", _backends("dequantize"))
@pytest.mark.parametrize("fmt", SCALE_ONE)
def test_dequantize_of_quantize_is_the_rounded_value(backend, fmt):
    x, codes = _in_range(fmt)
    q, scales = _on(backend, hal.ops.quantize, x, fmt, None if fmt == "mxfp4" else "tensor")
    y = _on(backend, hal.ops.dequantize, q, scales, fmt, None if fmt == "mxfp4" else "tensor")
    np.testing.assert_array_equal(np.asarray(y), F.decode(codes, _element(fmt)).astype(np.float32))
    assert np.signbit(np.asarray(y)).tolist() == np.signbit(F.decode(codes, _element(fmt))).tolist()  # -0 kept where the format has it


@pytest.mark.parametrize("backend", _backends("dequantize"))
@pytest.mark.parametrize("fmt", ["float8_e4m3fn", "float8_e4m3fnuz", "float8_e5m2"])
def test_dequantize_every_fp8_code(backend, fmt):
    codes = np.arange(256, dtype=np.uint8).reshape(2, 128)
    y = _on(backend, hal.ops.dequantize, codes.view(ML_DTYPES[fmt]), np.ones((2, 1), np.float32), fmt, "row")
    np.testing.assert_array_equal(np.asarray(y), codes.view(ML_DTYPES[fmt]).astype(np.float32))


# ---------------------------------------------------------------- E8M0 scales and nibble order


@pytest.mark.parametrize("backend", _backends("quantize"))
def test_mxfp4_scale_is_e8m0_of_the_shared_exponent(backend):
    """Scale code = floor(log2 amax) - 2 + 127: the ml_dtypes E8M0 code of that power of two.
    amax 0 gives code 0 (2^-127), where ml_dtypes has no zero (casting 0 gives NaN); NaN/inf give 0xFF."""
    amax = np.array([6.0, 7.99, 8.0, 1.0, 0.75, 2.0**-120, 2.0**-130, 3e38, 0.0, np.inf, np.nan], np.float32)
    x = np.zeros((amax.size, 32), np.float32)
    x[:, 7] = amax
    x[:, 8] = -amax / 3
    q, codes = _on(backend, hal.ops.quantize, x, "mxfp4")
    codes = np.asarray(codes)[:, 0]
    e = np.clip(np.floor(np.log2(amax[:8].astype(np.float64))) - 2, -127, 127)
    np.testing.assert_array_equal(codes[:8], np.exp2(e).astype(np.float32).astype(ml_dtypes.float8_e8m0fnu).view(np.uint8))
    np.testing.assert_array_equal(F.e8m0_decode(codes[:8]), codes[:8].view(ml_dtypes.float8_e8m0fnu).astype(np.float64))
    assert codes[8] == 0 and np.isnan(np.float32(0).astype(ml_dtypes.float8_e8m0fnu).astype(np.float64))
    assert (codes[9:] == 0xFF).all() and (np.asarray(q)[9:] == 0).all()


def test_pack_nibbles_puts_the_first_code_low():
    packed = F.pack_nibbles(np.array([[1, 2, 3, 4, 0xF, 0]], np.uint8))
    np.testing.assert_array_equal(packed, [[0x21, 0x43, 0x0F]])
    np.testing.assert_array_equal(F.unpack_nibbles(packed), [[1, 2, 3, 4, 0xF, 0]])
    with pytest.raises(ValueError):
        F.pack_nibbles(np.zeros(3, np.uint8))


@pytest.mark.parametrize("backend", _backends("quantize"))
def test_quantized_int4_and_e2m1_bytes_hold_the_first_element_low(backend):
    x = np.array([[7.0, -1.0, 2.0, -7.0]], np.float32)  # amax 7: scale 1
    q, _ = _on(backend, hal.ops.quantize, x, "int4", "row")
    np.testing.assert_array_equal(np.asarray(q), [[0xF7, 0x92]])  # 7 | -1 << 4, 2 | -7 << 4
    x = np.zeros((1, 32), np.float32)
    x[0, :4] = [6.0, 0.5, -1.0, 4.0]
    q, _ = _on(backend, hal.ops.quantize, x, "mxfp4")
    np.testing.assert_array_equal(np.asarray(q)[0, :2], [0x17, 0x6A])  # 6 = 0x7, 0.5 = 0x1; -1 = 0xA, 4 = 0x6
