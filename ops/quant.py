"""quantize / dequantize: float tensors to and from fp8, int8, int4, mxfp4 and nvfp4 with their scales.

Formats, scale layouts and the cast convention (round to nearest even, saturate finite overflow and
+-inf to +-max, NaN to the format's NaN) are in hal/formats.py; the semantics below follow it.

quantize(x, fmt, granularity=None, *, group_size=128, zero_point=False), x [..., M, K]:
- fp8, int8, int4: per scale group amax = max |x|; scale = amax / fmt.max in fp32 (1 where amax is 0),
  stored as float32; q = encode(x / scale). Returns (q, scales); int4 codes are packed two per byte.
  Non-finite inputs: a NaN makes its group's scale NaN and so every code of the group NaN (fp8) or 0
  (int8, int4, which have no NaN); an inf makes the scale inf, so the group's finite elements become
  (signed) zero codes and the inf itself NaN (fp8) or 0 (integers). Dequantizing gives NaN either way.
- int4 with zero_point (uint4 codes): lo = min(min x, 0), hi = max(max x, 0), scale = (hi - lo) / 15
  (1 where hi == lo), zero = clamp(rint(-lo / scale), 0, 15) as uint8, q = clamp(rint(x / scale) + zero, 0, 15).
  Returns (q, scales, zeros).
- mxfp4: E2M1 codes with one E8M0 scale per 32 along K: e = floor(log2 amax) - 2 clamped to
  [-127, 127] (-127 where amax is 0), code e + 127, 0xFF (NaN) where amax is not finite, and then
  the whole group's codes are +0 (E2M1 has no NaN). Returns (q, scale codes).
- nvfp4: tensor_scale = amax(x per leading index) / (448 * 6) in fp32 (1 where 0), per 16 along K a
  block scale encode_e4m3fn(amax_group / 6 / tensor_scale) (fp32 steps); q = encode_e2m1(x / (block
  scale * tensor_scale)), 0 where that product is 0. Returns (q, block scales, tensor_scale).
granularity: tensor, row (default), group (1 x group_size), block (group_size x group_size), channel;
mxfp4 / nvfp4 are always "group" with their own group (group_size is ignored).

dequantize(q, scales, fmt, granularity=None, *, zeros=None, tensor_scale=None, group_size=128,
out_dtype="float32") is the inverse, x = decode(q) * scale ((q - zero) * scale with zero points),
computed in fp32 and rounded once to out_dtype.

The references compute the per-group scales with the fp32 operations the semantics name (so a
kernel matches them exactly) and everything else in float64.
"""
import math

import numpy as np

from hal import formats as F
from hal.dtypes import FLOATS, name_of, to_numpy
from hal.opdef import Attr, POSITIVE, InvalidArgument, ErrorSample, OpDef, Sample, Tensor, random, strided

FP8 = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz")
FMTS = FP8 + ("int8", "int4", "mxfp4", "nvfp4")
FP4_GROUP = {"mxfp4": F.MXFP4_GROUP, "nvfp4": F.NVFP4_GROUP}
PACKED = ("int4", "mxfp4", "nvfp4")
Q_DTYPES = FP8 + ("int8", "uint8")
NVFP4_TENSOR_MAX = 448.0 * 6.0  # e4m3fn max times E2M1 max
_F32 = np.float32


def q_dtype(fmt):
    """Storage dtype of the codes of `fmt` (packed 4-bit formats: uint8 bytes)."""
    return "uint8" if fmt in PACKED else fmt


def scales_dtype(fmt):
    return {"mxfp4": "uint8", "nvfp4": "float8_e4m3fn"}.get(fmt, "float32")


# ---------------------------------------------------------------- argument checks


def _check_layout(a, k):
    """Fill in the granularity and group of a quantize / dequantize call and check them."""
    fmt = a["fmt"]
    if fmt is None:
        raise InvalidArgument("fmt", f"one of {FMTS}", "None")
    if fmt in FP4_GROUP:
        if a["granularity"] not in (None, "group"):
            raise InvalidArgument("granularity", f"'group' (or None) for {fmt}, whose scales are per {FP4_GROUP[fmt]} along K", repr(a["granularity"]))
        a["granularity"], a["group_size"] = "group", FP4_GROUP[fmt]
    elif a["granularity"] is None:
        a["granularity"] = "row"
    if k == 0:
        raise InvalidArgument("x" if "x" in a else "q", "a non-empty last dimension", "K = 0")


def _check_quantize(a):
    x = a["x"]
    _check_layout(a, x.shape[-1])
    if a["fmt"] in PACKED and x.shape[-1] % 2:
        raise InvalidArgument("x", f"an even last dimension for {a['fmt']} (two codes per byte)", f"shape {tuple(x.shape)}")
    if a["zero_point"] and a["fmt"] != "int4":
        raise InvalidArgument("zero_point", "False unless fmt is 'int4'", f"True with fmt {a['fmt']!r}")


def _logical_shape(q, fmt):
    """Shape [..., M, K] of the tensor that `q` encodes."""
    *lead, m, kq = q.shape
    return (*lead, m, 2 * kq if fmt in PACKED else kq)


def _check_tensor(a, name, dtype, shape):
    t = a[name]
    if name_of(t.dtype) != dtype:
        raise InvalidArgument(name, f"dtype {dtype} for fmt {a['fmt']}", name_of(t.dtype))
    if tuple(t.shape) != tuple(shape):
        raise InvalidArgument(name, f"shape {tuple(shape)}", f"shape {tuple(t.shape)}")


def _check_dequantize(a):
    fmt = a["fmt"]
    if fmt is None:
        raise InvalidArgument("fmt", f"one of {FMTS}", "None")
    q = a["q"]
    if name_of(q.dtype) != q_dtype(fmt):
        raise InvalidArgument("q", f"dtype {q_dtype(fmt)} for fmt {fmt}", name_of(q.dtype))
    shape = _logical_shape(q, fmt)
    _check_layout(a, shape[-1])
    sshape = F.scale_shape(shape, a["granularity"], a["group_size"])
    _check_tensor(a, "scales", scales_dtype(fmt), sshape)
    if a["zeros"] is not None:
        if fmt != "int4":
            raise InvalidArgument("zeros", "None unless fmt is 'int4'", f"a tensor with fmt {fmt!r}")
        _check_tensor(a, "zeros", "uint8", sshape)
    if fmt == "nvfp4":
        if a["tensor_scale"] is None:
            raise InvalidArgument("tensor_scale", "a float32 [..., 1, 1] tensor for nvfp4", "None")
        _check_tensor(a, "tensor_scale", "float32", (*shape[:-2], 1, 1))
    elif a["tensor_scale"] is not None:
        raise InvalidArgument("tensor_scale", "None unless fmt is 'nvfp4'", f"a tensor with fmt {fmt!r}")


def _quantize_outputs(a):
    x, fmt = a["x"], a["fmt"]
    shape = tuple(x.shape)
    sshape = F.scale_shape(shape, a["granularity"], a["group_size"])
    if fmt not in PACKED:
        return [(shape, fmt), (sshape, "float32")]
    packed = (*shape[:-1], shape[-1] // 2)
    if fmt == "int4":
        return [(packed, "uint8"), (sshape, "float32")] + ([(sshape, "uint8")] if a["zero_point"] else [])
    if fmt == "mxfp4":
        return [(packed, "uint8"), (sshape, "uint8")]
    return [(packed, "uint8"), (sshape, "float8_e4m3fn"), ((*shape[:-2], 1, 1), "float32")]


def _quantize_formats(a):
    fmt = a["fmt"]
    if fmt == "int4" and a["zero_point"]:
        return ["uint4", None, "int8"]
    return {"mxfp4": ["e2m1", "e8m0"], "nvfp4": ["e2m1", "float8_e4m3fn", None]}.get(fmt, [fmt, None])


# ---------------------------------------------------------------- references


def _group_reduce(x, granularity, group_size, reduce):
    """`reduce` (np.max, np.min) of x [..., M, K] over each scale group -> the scales' shape.

    Groups cut short at the edges are padded with zeros, which none of the reductions here can
    notice (amax of |x|, min(x, 0), max(x, 0))."""
    *lead, m, k = x.shape
    sr, sc = F.scale_shape(x.shape, granularity, group_size)[-2:]
    gr, gc = F.group_tile(granularity, m, k, group_size)
    padded = x
    if (sr * gr, sc * gc) != (m, k):
        padded = np.zeros((*lead, sr * gr, sc * gc), x.dtype)
        padded[..., :m, :k] = x
    return reduce(padded.reshape(*lead, sr, gr, sc, gc), axis=(-3, -1))


def _spread(s, shape, a):
    return F.expand_scales(s, shape, a["granularity"], a["group_size"])


def _amax_scale(amax, fmax):
    """scale = amax / fmax in fp32, 1 where amax is 0 (NaN and inf propagate)."""
    with np.errstate(invalid="ignore", over="ignore"):
        s = amax.astype(_F32) / _F32(fmax)
    return np.where(amax == 0, _F32(1), s)


def _stored(codes, fmt):
    return codes.view(to_numpy(fmt))


def _quantize_reference(a):
    x, fmt = a["x"], a["fmt"]
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        if fmt == "mxfp4":
            return _mxfp4_reference(x, a)
        if fmt == "nvfp4":
            return _nvfp4_reference(x, a)
        if a["zero_point"]:
            return _int4_zero_point_reference(x, a)
        scale = _amax_scale(_group_reduce(np.abs(x), a["granularity"], a["group_size"], np.max), F.FORMATS[fmt].max)
        codes = F.encode(F.apply_scales(x, scale, a["granularity"], a["group_size"], np.divide), fmt)
        q = F.pack_nibbles(codes) if fmt == "int4" else codes if fmt == "int8" else _stored(codes, fmt)
        return [q, scale.astype(np.float64)]


def _int4_zero_point_reference(x, a):
    lo = _group_reduce(np.minimum(x, 0.0), a["granularity"], a["group_size"], np.min).astype(_F32)
    hi = _group_reduce(np.maximum(x, 0.0), a["granularity"], a["group_size"], np.max).astype(_F32)
    scale = np.where(hi == lo, _F32(1), (hi - lo) / _F32(15))
    zero = np.clip(np.rint(np.nan_to_num(-lo / scale)), 0, 15)
    q = np.clip(np.rint(np.nan_to_num(x / _spread(scale, x.shape, a))) + _spread(zero, x.shape, a), 0, 15)
    return [F.pack_nibbles(q.astype(np.uint8)), scale.astype(np.float64), zero.astype(np.uint8)]


def _mxfp4_reference(x, a):
    amax = _group_reduce(np.abs(x), "group", F.MXFP4_GROUP, np.max)
    _, exponent = np.frexp(np.where(np.isfinite(amax) & (amax > 0), amax, 1.0))  # amax = m * 2^exponent, m in [0.5, 1)
    e = np.clip(exponent - 1 - 2, -127, 127)  # floor(log2 amax) - E2M1's emax
    e = np.where(amax == 0, -127, e)
    codes = np.where(np.isfinite(amax), e + 127, 0xFF).astype(np.uint8)
    q = F.encode(x / _spread(F.e8m0_decode(codes), x.shape, a), "e2m1")  # x / NaN -> +0
    return [F.pack_nibbles(q), codes]


def _nvfp4_reference(x, a):
    amax = _group_reduce(np.abs(x), "tensor", 1, np.max)
    tensor_scale = _amax_scale(amax, NVFP4_TENSOR_MAX)
    amax_g = _group_reduce(np.abs(x), "group", F.NVFP4_GROUP, np.max).astype(_F32)
    block = F.encode(amax_g / _F32(6) / tensor_scale, "float8_e4m3fn")
    step = F.decode(block, "float8_e4m3fn").astype(_F32) * tensor_scale
    v = x / _spread(step, x.shape, a)
    q = np.where(_spread(step, x.shape, a) == 0, 0, F.encode(v, "e2m1")).astype(np.uint8)
    return [F.pack_nibbles(q), _stored(block, "float8_e4m3fn"), tensor_scale.astype(np.float64)]


def _dequantize_values(q, scales, fmt, granularity, group_size, zeros=None, tensor_scale=None):
    """float64 x = decode(q) * scale of already checked arguments (fmt's default granularity filled in)."""
    shape = _logical_shape(q, fmt)
    if fmt in PACKED:
        codes = F.unpack_nibbles(q)
        if fmt != "int4":
            v = F.decode(codes, "e2m1")
        elif zeros is None:
            v = F.decode(codes, "int4")
        else:
            v = codes - F.expand_scales(F.values(zeros), shape, granularity, group_size)
    else:
        v = F.values(q)
    return F.apply_scales(v, F.scale_values(fmt, scales, tensor_scale), granularity, group_size)


def _dequantize_reference(a):
    with np.errstate(invalid="ignore", over="ignore"):
        return [_dequantize_values(a["q"], a["scales"], a["fmt"], a["granularity"], a["group_size"], a["zeros"], a["tensor_scale"])]


# ---------------------------------------------------------------- samples


def _qargs(x, fmt, granularity=None, group_size=128, zero_point=False):
    return {"x": x, "fmt": fmt, "granularity": granularity, "group_size": group_size, "zero_point": zero_point}


def _schemes():
    """(label, fmt, granularity, group_size, zero_point) of every scheme quantize supports."""
    grans = [("tensor", 128), ("row", 128), ("group", 128), ("group", 64), ("block", 128), ("channel", 128)]
    for fmt in FP8 + ("int8", "int4"):
        for zp in (False, True) if fmt == "int4" else (False,):
            for gran, g in grans:
                size = f" {g}" if gran in ("group", "block") else ""
                yield f"{fmt}{' zero_point' if zp else ''} {gran}{size}", fmt, gran, g, zp
    for fmt in FP4_GROUP:
        yield fmt, fmt, "group", FP4_GROUP[fmt], False


# Per format, values whose amax pins the per-tensor scale to exactly 1, at and around its rounding boundaries.
BOUNDARY_VALUES = {
    # subnormal step 2^-9: 2^-10 ties to 0, 3 * 2^-10 to 2^-8; 1 + 2^-4 ties to 1; 432 to 448
    "float8_e4m3fn": [448, -448, 2**-9, 2**-10, 3 * 2**-10, -0.0, 1 + 2**-4, 1 + 3 * 2**-4, 416, 432, 2**-6, 7 * 2**-10, 240, 2**-7 + 2**-10],
    # bias 8: everything halves, max 240, -0 becomes +0
    "float8_e4m3fnuz": [240, -240, 2**-10, 2**-11, 3 * 2**-11, -0.0, 1 + 2**-4, 232, 224, 2**-7],
    # subnormal step 2^-16; 1 + 2^-3 ties to 1; 53248 ties to 49152
    "float8_e5m2": [57344, -57344, 2**-16, 2**-17, 3 * 2**-17, -0.0, 1 + 2**-3, 1 + 3 * 2**-3, 53248, 2**-14],
    "int8": [127, -127, 0.5, 1.5, 2.5, -2.5, -0.5, 126.5, -126.5, -0.0, 0.49],
    "int4": [7, -7, 0.5, 1.5, 2.5, -2.5, 6.5, -6.5, -0.0, 3.5],
    # amax 7 still gives exponent 0: 7 saturates to 6; ties 0.25 -> 0, 0.75 -> 1, 5 -> 4
    "mxfp4": [7, 6, -6, 5, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, -5, -0.0, 0.2, 0.3],
}


def _quantize_samples(rng, dtype):
    # One ordinary sample per scheme: odd M, K not a multiple of any group (K even for packing).
    for label, fmt, gran, g, zp in _schemes():
        yield Sample(_qargs(random(rng, (133, 262), dtype), fmt, gran, g, zp), f"{label} 133x262")
    for fmt in FP4_GROUP:
        yield Sample(_qargs(random(rng, (7, 50), dtype), fmt), f"{fmt} 7x50: last group short")
    yield Sample(_qargs(random(rng, (5, 300), dtype), "float8_e4m3fn"), "default granularity (row)")
    yield Sample(_qargs(random(rng, (1, 2), dtype), "int4", "group", zero_point=True), "1x2 int4 zero_point")

    # Rank 3 (leading batch, MoE weights [E, N, K]): scales per leading index.
    for fmt, gran in (("float8_e4m3fn", "block"), ("float8_e4m3fnuz", "tensor"), ("int8", "channel"), ("int4", "group"), ("mxfp4", None), ("nvfp4", None)):
        yield Sample(_qargs(random(rng, (3, 130, 200), dtype), fmt, gran, 64 if fmt == "int4" else 128), f"rank 3 {fmt} {gran or 'group'}", "edge")
    for fmt, gran in (("float8_e5m2", "group"), ("int4", "block"), ("nvfp4", None)):
        yield Sample(_qargs(strided(random(rng, (9, 140), dtype)), fmt, gran), f"strided x {fmt}", "edge")
    for fmt, gran in (("float8_e4m3fn", "tensor"), ("float8_e4m3fn", "channel"), ("int8", "block"), ("int4", "row"), ("mxfp4", None), ("nvfp4", None)):
        yield Sample(_qargs(random(rng, (0, 64), dtype), fmt, gran), f"M = 0 {fmt} {gran or 'group'}", "edge")
    yield Sample(_qargs(random(rng, (2, 0, 64), dtype), "int4", "tensor", zero_point=True), "M = 0 rank 3 int4 zero_point tensor", "edge")

    # Magnitudes spanning the input dtype's range (float16 ~ 6e-8 .. 65504): each row from tiny to huge.
    lo, hi = (-6.0, 3.5) if dtype == "float16" else (-30.0, 30.0)
    span = 10.0 ** rng.uniform(lo, hi, (16, 256))
    wide = (random(rng, (16, 256), "float32").astype(np.float64) * span).astype(to_numpy(dtype))
    for label, fmt, gran, g, zp in _schemes():
        if gran in ("row", "block") or fmt in FP4_GROUP:
            yield Sample(_qargs(wide.copy(), fmt, gran, g, zp), f"huge dynamic range {label}", "edge")

    # Groups of zeros (scale 1; nvfp4: block scale 0), -0 included.
    for fmt, gran, g, zp in (("float8_e4m3fn", "group", 64, False), ("int8", "block", 64, False), ("int4", "group", 64, True),
                             ("float8_e4m3fnuz", "group", 64, False), ("mxfp4", None, 128, False), ("nvfp4", None, 128, False)):
        x = random(rng, (6, 192), dtype)
        x[:3, 64:128], x[3:, 64:128] = 0.0, -0.0
        yield Sample(_qargs(x, fmt, gran, g, zp), f"zero groups {fmt} {gran or 'group'}", "edge")
    x = np.zeros((4, 96), to_numpy(dtype))
    yield Sample(_qargs(x, "nvfp4"), "all zeros nvfp4 (tensor scale 1)", "edge")

    # Non-finite groups: a NaN or an inf in a group makes its scale NaN / inf (module docstring).
    for fmt in FP8 + ("int8", "mxfp4"):
        x = random(rng, (4, 128), dtype)
        x[0, 3], x[1, 40], x[2, 70], x[3, 100] = np.nan, np.inf, -np.inf, np.nan
        x[3, 101] = np.inf
        yield Sample(_qargs(x, fmt, "group", 32), f"NaN and inf groups {fmt}", "edge")

    # Exact boundary values at scale 1 (amax is the format's max), per tensor.
    for fmt, values in BOUNDARY_VALUES.items():
        x = np.asarray(values + [0.0] * (len(values) % 2), np.float64).astype(to_numpy(dtype))
        yield Sample(_qargs(x.reshape(1, -1), fmt, "tensor" if fmt not in FP4_GROUP else None), f"boundary values {fmt} at scale 1", "edge")
    # nvfp4 at scale 1: 2688 sets tensor_scale 1, groups of amax 6 get block scale 1.
    x = np.zeros((2, 32), np.float64)
    x[0, :16] = [6, -6, 5, 0.25, 0.75, 1.25, 1.75, 2.5, 3.5, -0.0, 0.5, 1, 1.5, 2, 3, 4]
    x[1, :16] = 2688.0
    x[1, 16:] = [6, 4, 3, 2, 1.5, 1, 0.5, 0.3, 0.2, -0.75, -1.75, -2.5, -3.5, -5, 5.5, 0.1]
    yield Sample(_qargs(x.astype(to_numpy(dtype)), "nvfp4"), "boundary values nvfp4 at scale 1", "edge")


def _dqargs(q, scales, fmt, granularity, group_size=128, zeros=None, tensor_scale=None, out_dtype="float32"):
    return {"q": q, "scales": scales, "fmt": fmt, "granularity": granularity, "zeros": zeros,
            "tensor_scale": tensor_scale, "group_size": group_size, "out_dtype": out_dtype}


def quantized(x, fmt, granularity=None, group_size=128, zero_point=False, out_dtype="float32"):
    """dequantize arguments holding the reference quantization of float array x."""
    a = _qargs(x, fmt, granularity, group_size, zero_point)
    _check_quantize(a)  # fills in the granularity and group
    outs = _quantize_reference(a | {"x": x.astype(np.float64)})
    q, scales = outs[0], outs[1]
    if scales.dtype == np.float64:
        scales = scales.astype(np.float32)
    zeros = outs[2] if zero_point else None
    tensor_scale = outs[2].astype(np.float32) if fmt == "nvfp4" else None
    return _dqargs(q, scales, fmt, a["granularity"], a["group_size"], zeros, tensor_scale, out_dtype)


def _fmts_of(dtype):
    """(fmt, zero_point) pairs whose codes are stored in `dtype`."""
    if dtype in FP8 or dtype == "int8":
        return [(dtype, False)]
    return [("int4", False), ("int4", True), ("mxfp4", False), ("nvfp4", False)]


def _dequantize_samples(rng, dtype):
    outs = FLOATS
    n = 0
    for label, fmt, gran, g, zp in _schemes():
        if (fmt, zp) not in _fmts_of(dtype):
            continue
        x = random(rng, (133, 262), "float32")
        yield Sample(quantized(x, fmt, gran, g, zp, outs[n % 3]), f"{label} 133x262 -> {outs[n % 3]}")
        n += 1
    for fmt, zp in _fmts_of(dtype):
        for out in outs:
            x = random(rng, (3, 37, 150), "float32", 4.0)
            gran = None if fmt in FP4_GROUP else ("block" if zp else "group")
            yield Sample(quantized(x, fmt, gran, 64, zp, out), f"rank 3 {fmt}{' zero_point' if zp else ''} -> {out}", "edge")
        a = quantized(random(rng, (9, 140), "float32"), fmt, None if fmt in FP4_GROUP else "group", 32, zp, "bfloat16")
        q = a["q"]
        a["q"] = strided(q.view(np.int8)).view(q.dtype) if q.dtype == np.uint8 else strided(q)  # strided() fills uint8 gaps with -1
        yield Sample(a, f"strided q {fmt}", "edge")
        yield Sample(quantized(random(rng, (0, 64), "float32"), fmt, None, 128, zp), f"M = 0 {fmt}", "edge")
        x = random(rng, (8, 256), "float32") * 10.0 ** rng.uniform(-20, 20, (8, 1)).astype(np.float32)
        yield Sample(quantized(x, fmt, None, 128, zp, "float16"), f"rows of very different magnitude {fmt} -> float16 (inf / 0 where out of range)", "edge")
    if dtype in FP8:  # every code, NaN and (e5m2) inf included, at a few scales
        codes = np.arange(256, dtype=np.uint8).reshape(4, 64).view(to_numpy(dtype))
        for out in outs:
            scales = np.array([[0.5, 3.0], [1.0, 2.0 ** -20], [7.0, 1e3], [1.0, 1.0]], np.float32)
            yield Sample(_dqargs(codes, scales, dtype, "group", 32, out_dtype=out), f"every code -> {out}", "edge")
    if dtype == "uint8":  # every byte for each 4-bit format
        codes = np.arange(256, dtype=np.uint8).reshape(4, 64)
        e8m0 = np.array([[0, 1, 127, 254], [100, 126, 128, 0xFF], [127, 127, 120, 140], [3, 200, 127, 127]], np.uint8)
        yield Sample(_dqargs(codes, e8m0, "mxfp4", "group", 32), "every byte mxfp4, E8M0 extremes", "edge")
        nv = np.array([[0x7E, 0x01, 0x38, 0x40] * 2, [0x00, 0x7F, 0xB8, 0x30] * 2, [0x38] * 8, [0x08, 0x70, 0x38, 0x39] * 2], np.uint8)
        yield Sample(_dqargs(codes, nv.view(to_numpy("float8_e4m3fn")), "nvfp4", "group", 16, tensor_scale=np.array([[0.75]], np.float32)),
                     "every byte nvfp4, e4m3 scale extremes", "edge")
        yield Sample(_dqargs(codes, np.array([[0.5], [1.0], [2.0], [-3.0]], np.float32), "int4", "row"), "every byte int4", "edge")
        zeros = np.array([[0], [15], [8], [3]], np.uint8)
        yield Sample(_dqargs(codes, np.array([[0.5], [1.0], [2.0], [3.0]], np.float32), "int4", "row", zeros=zeros), "every byte int4 with zeros", "edge")
    if dtype == "int8":
        codes = np.arange(-128, 128, dtype=np.int8).reshape(2, 128)
        yield Sample(_dqargs(codes, np.array([[1.0], [0.01]], np.float32), "int8", "row"), "every int8 code", "edge")


# ---------------------------------------------------------------- errors


def _quantize_errors(rng):
    def base(shape=(4, 64), dtype="float32", **over):
        return _qargs(random(rng, shape, dtype), "float8_e4m3fn") | over

    yield ErrorSample(base(fmt="float8_e4m3"), "unknown fmt", match="fmt")
    yield ErrorSample(base(fmt=None), "fmt missing", match="fmt")
    yield ErrorSample(base(granularity="column"), "unknown granularity", match="granularity")
    yield ErrorSample(base(fmt="mxfp4", granularity="row"), "mxfp4 per row", match="granularity")
    yield ErrorSample(base(fmt="nvfp4", granularity="block"), "nvfp4 per block", match="granularity")
    yield ErrorSample(base(shape=(4, 63), fmt="int4"), "int4 with odd K", match="even")
    yield ErrorSample(base(shape=(4, 31), fmt="mxfp4"), "mxfp4 with odd K", match="even")
    yield ErrorSample(base(zero_point=True), "zero_point with fp8", match="zero_point")
    yield ErrorSample(base(shape=(64,)), "rank-1 x", match="rank")
    yield ErrorSample(base(shape=(4, 0)), "K = 0", match="non-empty")
    yield ErrorSample(base(group_size=0, granularity="group"), "group_size 0", match="group_size")
    yield ErrorSample(base(group_size="wide"), "group_size not an int", match="group_size")
    yield ErrorSample(_qargs(np.ones((4, 64), np.int8), "int8"), "int8 x", match="dtype")


def _dequantize_errors(rng):
    def base(fmt="float8_e4m3fn", granularity="group", **over):
        return quantized(random(rng, (8, 256), "float32"), fmt, granularity, 128, fmt == "int4") | over

    yield ErrorSample(base() | {"fmt": "int8"}, "q dtype not the fmt's", match="'q'")
    yield ErrorSample(base() | {"fmt": None}, "fmt missing", match="fmt")
    yield ErrorSample(base(scales=np.ones((8, 3), np.float32)), "scales shape", match="scales")
    yield ErrorSample(base(scales=np.ones((8, 2), np.float16)), "scales float16", match="scales")
    yield ErrorSample(base() | {"granularity": "row"}, "granularity other than the scales'", match="scales")
    yield ErrorSample(base(zeros=np.zeros((8, 2), np.uint8)), "zeros with fp8", match="zeros")
    yield ErrorSample(base("int4") | {"zeros": np.zeros((8, 3), np.uint8)}, "zeros shape", match="zeros")
    yield ErrorSample(base("nvfp4", None) | {"tensor_scale": None}, "nvfp4 without tensor_scale", match="tensor_scale")
    yield ErrorSample(base("nvfp4", None) | {"tensor_scale": np.ones((1,), np.float32)}, "tensor_scale shape", match="tensor_scale")
    yield ErrorSample(base("mxfp4", None) | {"tensor_scale": np.ones((1, 1), np.float32)}, "tensor_scale with mxfp4", match="tensor_scale")
    yield ErrorSample(base("mxfp4", None) | {"granularity": "row"}, "mxfp4 per row", match="granularity")
    yield ErrorSample(base(out_dtype="int8"), "integer out_dtype", match="out_dtype")
    yield ErrorSample(base() | {"q": np.ones((8,), np.int8), "fmt": "int8"}, "rank-1 q", match="rank")
    yield ErrorSample(base() | {"q": np.ones((8, 256), np.int16)}, "int16 q", match="dtype")


# ---------------------------------------------------------------- benchmarks and torch peers


def _quantize_bench(rng, dtype, fmt="float8_e4m3fn", m=4096, k=7168):
    """DeepSeek-V3 activations per 1 x 128 group (hidden 7168)."""
    return _qargs(random(rng, (m, k), dtype), fmt, "group" if fmt not in FP4_GROUP else None)


def _quantize_cost(a):
    x = a["x"]
    out = sum(math.prod(shape) * to_numpy(dtype).itemsize for shape, dtype in _quantize_outputs(a))
    return 3 * x.size, x.nbytes + out


def _torch_tiles(t, a, m, k):
    """x [..., M, K] zero-padded and viewed as [..., SR, gr, SC, gc] scale groups (the padding is never an amax)."""
    import torch

    *lead, sr, sc = F.scale_shape((*t.shape[:-2], m, k), a["granularity"], a["group_size"])
    gr, gc = F.group_tile(a["granularity"], m, k, a["group_size"])
    t = torch.nn.functional.pad(t, (0, sc * gc - k, 0, sr * gr - m))
    return t.reshape(*lead, sr, gr, sc, gc)


def _torch_round_to_grid(v, grid):
    """v rounded to the nearest of the non-negative `grid` values by magnitude (sign kept), saturating."""
    import torch

    mids = (grid[1:] + grid[:-1]) / 2
    idx = torch.bucketize(v.abs(), mids)
    return torch.where(v < 0, -grid[idx], grid[idx])


def _quantize_peer(t):
    """What a user writes without hal: amax per group, divide, cast (fp8 via torch's dtypes, clamped
    first since torch's cast does not saturate; integers with round + clamp; fp4 by nearest grid value)."""
    import torch

    fmt, x = t["fmt"], t["x"]
    m, k = x.shape[-2:]
    e2m1 = torch.tensor([0, 0.5, 1, 1.5, 2, 3, 4, 6])

    def run():
        g = _torch_tiles(x.float(), t, m, k)
        amax = g.abs().amax(dim=(-3, -1), keepdim=True)
        if fmt == "mxfp4":
            scale = torch.exp2(torch.floor(torch.log2(amax)) - 2)
            return _torch_round_to_grid(g / scale, e2m1), scale
        if fmt == "nvfp4":
            tensor_scale = amax.amax(dim=(-4, -2), keepdim=True) / NVFP4_TENSOR_MAX
            block = (amax / 6 / tensor_scale).to(torch.float8_e4m3fn)
            return _torch_round_to_grid(g / (block.float() * tensor_scale), e2m1), block, tensor_scale
        f = F.FORMATS[fmt]
        scale = torch.where(amax == 0, 1.0, amax / f.max)
        v = g / scale
        if fmt in FP8:
            return v.clamp(-f.max, f.max).to(getattr(torch, fmt)), scale
        return v.round().clamp(f.min, f.max).to(torch.int8), scale

    return run


def _dequantize_bench(rng, dtype, m=4096, k=7168):
    """The fp8 activations of quantize's benchmark, back to bfloat16."""
    fmt = dtype if dtype in FP8 else {"int8": "int8", "uint8": "int4"}[dtype]
    return quantized(random(rng, (m, k), "float32"), fmt, "group", 128, out_dtype="bfloat16")


def _dequantize_cost(a):
    n = math.prod(_logical_shape(a["q"], a["fmt"]))
    return n, a["q"].nbytes + a["scales"].nbytes + n * to_numpy(a["out_dtype"]).itemsize


def _dequantize_peer(t):
    """decode, multiply by the repeated scales, cast: the user's way for fp8 and int8 (int4 by nibble masks)."""
    import torch

    fmt, q, gran, g = t["fmt"], t["q"], t["granularity"], t["group_size"]
    out = getattr(torch, t["out_dtype"])

    def expand(s, m, k):
        rows, cols = F.group_tile(gran, m, k, g)
        return s.repeat_interleave(rows, -2)[..., :m, :].repeat_interleave(cols, -1)[..., :k]

    def run():
        if fmt == "int4":
            codes = torch.stack((q & 0xF, q >> 4), dim=-1).flatten(-2).to(torch.int16)
            m, k = codes.shape[-2:]
            v = codes - expand(t["zeros"], m, k) if t["zeros"] is not None else torch.where(codes >= 8, codes - 16, codes)
        else:
            v = q.float()
            m, k = v.shape[-2:]
        return (v * expand(t["scales"], m, k)).to(out)

    return run


quantize = OpDef(
    name="quantize",
    doc="quantize(x, fmt, granularity=None, *, group_size=128, zero_point=False): x [..., M, K] to fmt "
    f"(one of {', '.join(FMTS)}) with scales per tensor / row / 1 x group_size group / group_size^2 block / "
    "channel; returns (q, scales) (+ zeros for int4 zero_point, + tensor_scale for nvfp4). See ops/quant.py.",
    params=[
        Tensor("x", min_rank=2),
        Attr("fmt", None, choices=FMTS),
        Attr("granularity", None, choices=F.GRANULARITIES),
        "*",
        Attr("group_size", 128, int, range=POSITIVE),
        Attr("zero_point", False, bool),
    ],
    check=_check_quantize,
    outputs=_quantize_outputs,
    results=("q", "scales", "zeros_or_tensor_scale?"),
    reference=_quantize_reference,
    samples=_quantize_samples,
    error_samples=_quantize_errors,
    formats=_quantize_formats,
    bench=_quantize_bench,
    cost=_quantize_cost,
    torch_peer=_quantize_peer,
)

dequantize = OpDef(
    name="dequantize",
    doc="dequantize(q, scales, fmt, granularity=None, *, zeros=None, tensor_scale=None, group_size=128, "
    "out_dtype='float32'): the inverse of quantize, decode(q) * scale ((q - zero) * scale with zero points) "
    "in fp32, rounded once to out_dtype.",
    params=[
        Tensor("q", dtypes=Q_DTYPES, min_rank=2),
        Tensor("scales", dtypes=("float32", "uint8", "float8_e4m3fn"), min_rank=2),
        Attr("fmt", None, choices=FMTS),
        Attr("granularity", None, choices=F.GRANULARITIES),
        "*",
        Tensor("zeros", dtypes=("uint8",), optional=True, min_rank=2),
        Tensor("tensor_scale", dtypes=("float32",), optional=True, min_rank=2),
        Attr("group_size", 128, int, range=POSITIVE),
        Attr("out_dtype", "float32", choices=FLOATS),
    ],
    check=_check_dequantize,
    outputs=lambda a: [(_logical_shape(a["q"], a["fmt"]), a["out_dtype"])],
    reference=_dequantize_reference,
    samples=_dequantize_samples,
    error_samples=_dequantize_errors,
    bench=_dequantize_bench,
    cost=_dequantize_cost,
    torch_peer=_dequantize_peer,
)

OPS = (quantize, dequantize)
