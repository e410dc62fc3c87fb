"""Low-precision formats as data, and their float64 reference conversions.

Every format hal quantizes to is described here once: bit layout, largest finite value, special
codes, storage. The conversions below are written from the bit layouts (not through ml_dtypes), so
that tests can cast the same values through ml_dtypes as an independent check.

hal's cast convention, the same on every backend: round to nearest, ties to the even code; a
finite value beyond the largest finite one, and +-inf, saturate to +-max (NVIDIA's "satfinite";
ml_dtypes instead gives NaN from 465 up for e4m3fn and inf for e5m2); NaN stays NaN where the
format has one (fp4 has none: a NaN element becomes +0 and its block's scale carries the NaN);
negative zero is kept where the format has it (e4m3fnuz and the integers have none).

Scales have one entry per quantization group; for x of shape [..., M, K]:
  "tensor" [..., 1, 1], "row" (per token) [..., M, 1], "group" (1 x g along K) [..., M, ceil(K/g)],
  "block" (g x g) [..., ceil(M/g), ceil(K/g)], "channel" (per column) [..., 1, K].
Packed 4-bit formats hold two codes per byte along K, the first in the low nibble.
"""
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Format:
    name: str
    storage: str  # hal dtype of the stored codes / values
    max: float  # largest finite magnitude
    exponent_bits: int = 0  # 0 for the integer formats
    mantissa_bits: int = 0
    bias: int = 0
    nan: tuple = ()  # codes that are NaN
    inf: int = None  # code of +inf (-inf is it with the sign bit)
    negative_zero: bool = True
    packed: bool = False  # two 4-bit codes per byte
    min: float = None  # integer formats: smallest value

    @property
    def bits(self):
        return 4 if self.name in ("e2m1", "int4", "uint4") else 8

    @property
    def is_float(self):
        return self.exponent_bits > 0

    @property
    def sign_bit(self):
        return 1 << (self.bits - 1)


FORMATS = {f.name: f for f in (
    Format("float8_e4m3fn", "float8_e4m3fn", 448.0, 4, 3, 7, nan=(0x7F, 0xFF)),
    Format("float8_e4m3fnuz", "float8_e4m3fnuz", 240.0, 4, 3, 8, nan=(0x80,), negative_zero=False),
    Format("float8_e5m2", "float8_e5m2", 57344.0, 5, 2, 15, nan=(0x7D, 0x7E, 0x7F, 0xFD, 0xFE, 0xFF), inf=0x7C),
    Format("e2m1", "uint8", 6.0, 2, 1, 1, packed=True),  # fp4 elements of mxfp4 / nvfp4
    Format("int8", "int8", 127.0, min=-128.0, negative_zero=False),
    Format("int4", "uint8", 7.0, min=-8.0, negative_zero=False, packed=True),
    Format("uint4", "uint8", 15.0, min=0.0, negative_zero=False, packed=True),
)}


def _magnitude(code, f):
    """Value of a non-negative minifloat code (sign bit clear), from the bit fields."""
    e = code >> f.mantissa_bits
    m = code & ((1 << f.mantissa_bits) - 1)
    if e == 0:
        return m * 2.0 ** (1 - f.bias - f.mantissa_bits)
    return (1 + m / 2**f.mantissa_bits) * 2.0 ** (e - f.bias)


def _table(f):
    """float64 value of every code of a float format."""
    values = np.empty(1 << f.bits)
    for code in range(1 << f.bits):
        mag = _magnitude(code & (f.sign_bit - 1), f)
        values[code] = -mag if code & f.sign_bit else mag
    if f.inf is not None:
        values[f.inf], values[f.inf | f.sign_bit] = np.inf, -np.inf
    values[list(f.nan)] = np.nan
    if not f.negative_zero:
        values[f.sign_bit] = np.nan if f.sign_bit in f.nan else 0.0
    return values


_TABLES = {name: _table(f) for name, f in FORMATS.items() if f.is_float}


def decode(codes, fmt):
    """float64 values of unpacked codes (uint8 codes of a float format, or integers)."""
    f = FORMATS[fmt]
    codes = np.asarray(codes)
    if f.is_float:
        return _TABLES[fmt][codes.view(np.uint8) if codes.dtype.itemsize == 1 else codes.astype(np.uint8)]
    if fmt == "int4":
        c = codes.astype(np.int64) & 0xF
        return np.where(c >= 8, c - 16, c).astype(np.float64)
    return codes.astype(np.float64)


def values(x):
    """float64 values of a float or fp8 array; fp8 through the tables of decode (ml_dtypes' astype takes
    about 5x as long)."""
    x = np.asarray(x)
    name = x.dtype.name
    return decode(x, name) if name in FORMATS and FORMATS[name].is_float else x.astype(np.float64)


ENCODE_CHUNK = 1 << 18  # elements per pass of encode: its temporaries stay in cache, not in fresh pages


def encode(x, fmt):
    """Codes (uint8; int8 for "int8") of float64 values under hal's convention (module docstring).

    Float formats round by arithmetic, exactly: |x| saturated to the largest value, its binade e
    (floor(log2), at least the smallest normal one's e_min), n = rint(|x| / 2^(e - m)) (round half to
    even: an even n is an even code), and the code ((e - e_min) << m) + n, which also holds where n
    reaches 2^(m + 1) (the next binade) and in the subnormals."""
    f = FORMATS[fmt]
    x = np.asarray(x, np.float64)
    if not f.is_float:
        q = np.clip(np.rint(np.nan_to_num(x, nan=0.0, posinf=f.max, neginf=f.min)), f.min, f.max)
        return q.astype(np.int8) if fmt == "int8" else (q.astype(np.int64) & 0xF).astype(np.uint8)
    m, e_min = f.mantissa_bits, 1 - f.bias
    flat, codes = x.reshape(-1), np.empty(x.size, np.uint8)
    for start in range(0, flat.size, ENCODE_CHUNK):
        v = flat[start:start + ENCODE_CHUNK]
        nan = np.isnan(v)
        a = np.where(nan, 0.0, np.minimum(np.abs(v), f.max))  # saturate (inf included)
        e = np.maximum(np.frexp(a)[1] - 1, e_min)  # frexp: a = fraction * 2^exponent, fraction in [0.5, 1)
        e[a == 0] = e_min  # frexp(0) has exponent 0
        code = ((e - e_min) << m) + np.rint(np.ldexp(a, m - e)).astype(np.int64)
        negative = np.signbit(v) & (f.negative_zero | (code != 0))
        code |= np.where(negative, f.sign_bit, 0)
        codes[start:start + ENCODE_CHUNK] = np.where(nan, f.nan[0] if f.nan else 0, code)
    return codes.reshape(x.shape)


def _ordinals(f):
    """The ordinal of every code of a float format: its magnitude's code, negated for a set sign bit."""
    codes = np.arange(1 << f.bits)
    mag = codes & (f.sign_bit - 1)
    return np.where(codes & f.sign_bit, -mag, mag).astype(np.int16)


_ORDINALS = {name: _ordinals(f) for name, f in FORMATS.items() if f.is_float}


def ordinal(codes, fmt):
    """Integers whose differences count representable values between codes (units in the last place).

    NaN codes map to 0 here; callers compare NaN-ness separately."""
    f = FORMATS[fmt]
    if not f.is_float:
        return decode(codes, fmt).astype(np.int64)
    c = np.asarray(codes)
    return _ORDINALS[fmt][c.view(np.uint8) if c.dtype.itemsize == 1 else c.astype(np.uint8)]


def pack_nibbles(codes):
    """uint8 codes (low 4 bits used) [..., 2n] -> bytes [..., n], first code in the low nibble."""
    c = np.asarray(codes).astype(np.uint8) & 0xF
    if c.shape[-1] % 2:
        raise ValueError("packing two codes per byte needs an even last dimension")
    return (c[..., 0::2] | (c[..., 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed):
    """bytes [..., n] -> uint8 codes [..., 2n]."""
    p = np.asarray(packed).astype(np.uint8)
    out = np.empty(p.shape[:-1] + (2 * p.shape[-1],), np.uint8)
    out[..., 0::2], out[..., 1::2] = p & 0xF, p >> 4
    return out


GRANULARITIES = ("tensor", "row", "group", "block", "channel")


def scale_shape(shape, granularity, group_size=128):
    """Shape of the scales of an [..., M, K] tensor (module docstring)."""
    *lead, m, k = shape
    g = group_size
    return tuple(lead) + {"tensor": (1, 1), "row": (m, 1), "group": (m, math.ceil(k / g)),
                          "block": (math.ceil(m / g), math.ceil(k / g)), "channel": (1, k)}[granularity]


def group_tile(granularity, m, k, group_size=128):
    """(rows, columns) of an [..., M, K] tensor that one scale covers, at least 1 each."""
    g = group_size
    rows, cols = {"tensor": (m, k), "row": (1, k), "group": (1, g), "block": (g, g), "channel": (m, 1)}[granularity]
    return max(rows, 1), max(cols, 1)


def expand_scales(scales, shape, granularity, group_size=128):
    """Scales [..., sr, sc] repeated to one per element of an [..., M, K] tensor."""
    *_, m, k = shape
    s = np.asarray(scales)
    rows, cols = group_tile(granularity, m, k, group_size)
    return np.repeat(np.repeat(s, rows, axis=-2)[..., :m, :], cols, axis=-1)[..., :k]


def apply_scales(x, scales, granularity, group_size=128, op=np.multiply):
    """op(x, scale of each element) for x [..., M, K] and scales [..., sr, sc]: in the tensor's blocked
    shape where the groups tile it exactly (no expanded copy of the scales), else through expand_scales."""
    *lead, m, k = x.shape
    rows, cols = group_tile(granularity, m, k, group_size)
    s = np.asarray(scales)
    if m % rows or k % cols:
        return op(x, expand_scales(s, x.shape, granularity, group_size))
    blocked = x.reshape(*lead, m // rows, rows, k // cols, cols)
    return op(blocked, s[..., :, None, :, None]).reshape(x.shape)


def e8m0_decode(codes):
    """float64 values of E8M0 scale codes: 2^(code - 127), 0xFF is NaN."""
    c = np.asarray(codes).astype(np.int64)
    return np.where(c == 0xFF, np.nan, np.ldexp(1.0, c - 127))


def code_values(fmt):
    """float64 value of every stored code of an element format, indexed by the code: 256 for the byte
    formats (int8 by its byte), 16 for the 4-bit ones (one nibble)."""
    codes = np.arange(1 << FORMATS[fmt].bits, dtype=np.uint8)
    return decode(codes.view(np.int8) if fmt == "int8" else codes, fmt)


def scale_values(fmt, scales, tensor_scale=None):
    """float64 multipliers of stored scales: 2^(code - 127) of E8M0 codes (mxfp4), the e4m3 value times
    the fp32 tensor scale (nvfp4; exact: 4 + 24 significant bits), the scales themselves otherwise."""
    s = np.asarray(scales)
    if fmt == "mxfp4":
        return e8m0_decode(s)
    values = decode(s, "float8_e4m3fn") if fmt == "nvfp4" and s.dtype.itemsize == 1 else s.astype(np.float64)  # codes, or already values
    return values * np.asarray(tensor_scale, np.float64) if fmt == "nvfp4" else values


# Block sizes and scale formats of the two fp4 schemes.
MXFP4_GROUP, NVFP4_GROUP = 32, 16
