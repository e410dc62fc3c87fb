"""CPU kernels: quantize / dequantize (semantics in ops/quant.py, formats in hal/formats.py).

quantize reads x once when every scale group lies in one row (row, group, mxfp4, nvfp4): each
parallel task takes a row, and per group finds the amax, derives the scale and encodes the codes
while the group is in L1. Groups that span rows (tensor, block, channel) first reduce chunks of
rows in parallel to partial statistics, combine them into the scales, then encode row by row.

Codes are computed from the float32 bits (round to nearest even, saturate, NaN), not by searching
a table, so the conversion is the same few integer operations for every element and vectorizes.
dequantize looks codes up in a float32 table of the format's values (256 entries, or 16 for a
nibble) and multiplies by the group's float32 scale.
"""
import math

import numpy as np
from numba import njit, prange

from hal import formats as F

from .common import F32, HELPER, KERNEL, Kernel, as_rows, bits_f32, f32_bits, load, store

_Q_DTYPES = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "int8", "uint8")

# How a group's scale is found (ops/quant.py): amax / max, zero point (uint4), E8M0 exponent, NVFP4.
SYMMETRIC, ZERO_POINT, MXFP4, NVFP4 = 0, 1, 2, 3
_ROW_CHUNK = 16  # rows per task when reducing groups that span rows: enough tasks for every core


def _element_params(fmt):
    """The integers the element encoder needs, for hal.formats format `fmt`:
    (is_float, mantissa bits, bias, float32 bits of max, code of max, NaN code, keeps -0, sign bit, min, max)."""
    f = F.FORMATS[fmt]
    if not f.is_float:
        return (0, 0, 0, 0, 0, 0, 0, 0, int(f.min), int(f.max))
    max_code = int(F.encode(f.max, fmt))
    max_bits = int(np.array(f.max, np.float32).view(np.uint32))
    nan_code = f.nan[0] if f.nan else 0
    return (1, f.mantissa_bits, f.bias, max_bits, max_code, nan_code, int(f.negative_zero), f.sign_bit, 0, 0)


_E4M3FN = _element_params("float8_e4m3fn")  # nvfp4 block scales
_E4M3FN_VALUES = F.decode(np.arange(256, dtype=np.uint8), "float8_e4m3fn").astype(np.float32)


# ---------------------------------------------------------------- element conversion


@njit(**HELPER)
def _encode_float(v, p):
    """Code of float32 v in the minifloat described by p: RNE, |v| >= max (inf too) -> max, NaN -> NaN code."""
    _, man, bias, max_bits, max_code, nan_code, neg_zero, sign_bit, _, _ = p
    x = np.int64(f32_bits(v))
    a = x & 0x7FFFFFFF
    shift = 23 - man
    normal_min = (128 - bias) << 23  # float32 bits of the format's smallest normal, 2^(1 - bias)
    if a > 0x7F800000:
        return nan_code
    if a >= max_bits:
        code = max_code
    elif a >= normal_min:
        # Keep the top `man` mantissa bits, rounding half to even (a carry moves into the exponent),
        # then rebias the exponent field.
        code = ((a + (1 << (shift - 1)) - 1 + ((a >> shift) & 1)) >> shift) - ((127 - bias) << man)
    else:
        # Subnormal in the format: the significand (implicit bit included) shifted right so that
        # one unit is the format's smallest subnormal, rounding half to even; can reach 1 << man,
        # which is the smallest normal's code.
        e = a >> 23
        significand = (a & 0x7FFFFF) | (0x800000 if e > 0 else 0)
        s = min(150 + (1 - bias) - man - max(e, 1), 25)  # >= shift + 1; from 25 on, every value rounds to 0
        code = (significand + (1 << (s - 1)) - 1 + ((significand >> s) & 1)) >> s
    if x >> 31 and (neg_zero or code != 0):
        code |= sign_bit
    return code


@njit(**HELPER)
def _encode_int(v, lo, hi):
    """rint(v) (half to even) clamped to [lo, hi]; NaN -> 0."""
    if v != v:
        return 0
    c = np.rint(v)
    return lo if c < lo else (hi if c > hi else np.int64(c))


@njit(**HELPER)
def _nonneg_max(a, v):
    """max(a, |v|) over float32 bits: for non-negative floats bit order is value order, and NaN bits
    exceed inf's, so a NaN wins (integer max vectorizes where a float max would not)."""
    b = np.int64(f32_bits(v)) & 0x7FFFFFFF
    return b if b > a else a


@njit(**HELPER)
def _pow2(e):
    """2^e in float32 for e in [-127, 127] (2^-127 is subnormal)."""
    return bits_f32(np.uint32((e + 127) << 23)) if e > -127 else bits_f32(np.uint32(0x00400000))


@njit(**HELPER)
def _group_scale(mode, amax, lo, hi, fmax, tensor_scale):
    """(divisor of the group's elements, float32 scale to store, uint8 code to store, code offset)."""
    if mode == SYMMETRIC:
        s = F32(1.0) if amax == 0 else amax / fmax
        return s, s, np.uint8(0), 0
    if mode == ZERO_POINT:
        s = F32(1.0) if hi == lo else (hi - lo) / F32(15.0)
        zero = _encode_int(-lo / s, 0, 15)
        return s, s, np.uint8(zero), zero
    if mode == MXFP4:
        biased = np.int64(f32_bits(amax)) >> 23  # amax >= 0: floor(log2 amax) + 127 for normals
        if biased == 255:  # inf or NaN: scale NaN, and x / NaN encodes to +0
            return F32(np.nan), F32(0.0), np.uint8(0xFF), 0
        e = max(biased - 127 - 2, -127)  # minus E2M1's emax; subnormal and zero amax clamp to -127
        return _pow2(e), F32(0.0), np.uint8(e + 127), 0
    # NVFP4: an e4m3fn block scale relative to the fp32 tensor scale
    code = _encode_float(amax / F32(6.0) / tensor_scale, _E4M3FN)
    return _E4M3FN_VALUES[code] * tensor_scale, F32(0.0), np.uint8(code), 0


# ---------------------------------------------------------------- quantize


@njit(**HELPER)
def _max_nan(a, b):
    """max(a, b), NaN if either is NaN."""
    return a if (a != a or a > b) else b


@njit(**HELPER)
def _min_nan(a, b):
    return a if (a != a or a < b) else b


@njit(**HELPER)
def _load_row(x, r, row):
    """row = x[r] widened to float32 (a loop of its own, so that it vectorizes)."""
    for j in range(row.shape[0]):
        row[j] = load(x, (r, j))


@njit(**HELPER)
def _group_stats(row, j0, j1, zero_point):
    """Statistics of row[j0:j1] that the scale needs: (amax, 0, 0), or with zero points
    (0, min(min x, 0), max(max x, 0)). A NaN makes them NaN."""
    if zero_point:
        nan = False
        lo, hi = F32(0.0), F32(0.0)
        for j in range(j0, j1):
            v = row[j]
            nan |= v != v
            lo = v if v < lo else lo
            hi = v if v > hi else hi
        if nan:
            return F32(0.0), F32(np.nan), F32(np.nan)
        return F32(0.0), lo, hi
    bits = np.int64(0)
    for j in range(j0, j1):
        bits = _nonneg_max(bits, row[j])
    return bits_f32(bits), F32(0.0), F32(0.0)


@njit(**HELPER)
def _encode_span(row, j0, j1, divisor, offset, p, codes):
    """codes[j] = code of row[j] / divisor (+ offset for zero points), for j in [j0, j1)."""
    if p[0]:
        for j in range(j0, j1):
            codes[j] = _encode_float(row[j] / divisor, p)
    else:
        lo, hi = p[8] - offset, p[9] - offset
        for j in range(j0, j1):
            codes[j] = (_encode_int(row[j] / divisor, lo, hi) + offset) & 0xFF


@njit(**KERNEL)
def _quantize_rows(x, m, gr, gc, inline, mode, fmax, p, tensor_scales, divisors, offsets, scale_f32, scale_u8, q):
    """Encode x [B*M, K] row by row into q (uint8 [B*M, K], or [B*M, K/2] packed).

    Scale group (b, i, c) covers rows i*gr.. and columns c*gc.. of batch b; all per-group arrays
    are [B, SR, SC]. inline (gr == 1): find each group's scale here and store it; else read the
    divisors and offsets that _block_scales stored."""
    rows, k = x.shape
    packed = q.shape[1] != k
    for r in prange(rows):
        b, i = r // m, (r % m) // gr
        row = np.empty(k, np.float32)
        _load_row(x, r, row)
        codes = np.empty(k, np.uint8) if packed else q[r]
        for c in range((k + gc - 1) // gc):
            j0, j1 = c * gc, min(c * gc + gc, k)
            if inline:
                amax, lo, hi = _group_stats(row, j0, j1, mode == ZERO_POINT)
                d, s, u, o = _group_scale(mode, amax, lo, hi, fmax, tensor_scales[b])
                divisors[b, i, c], offsets[b, i, c], scale_f32[b, i, c], scale_u8[b, i, c] = d, o, s, u
            if mode == NVFP4 and divisors[b, i, c] == 0:  # a zero block scale: codes 0 by definition
                codes[j0:j1] = 0
            else:
                _encode_span(row, j0, j1, divisors[b, i, c], offsets[b, i, c], p, codes)
        if packed:  # two codes per byte, the first in the low nibble
            for j in range(k // 2):
                q[r, j] = (codes[2 * j] & 0xF) | (codes[2 * j + 1] << 4)


@njit(**KERNEL)
def _block_scales(x, m, gr, gc, zero_point, mode, fmax, divisors, offsets, scale_f32, scale_u8):
    """Scales of groups spanning rows: statistics of chunks of up to _ROW_CHUNK rows of one group
    row in parallel, then per group the combined statistics give the scale."""
    k = x.shape[1]
    batch, n_sr, n_sc = divisors.shape
    chunks = (gr + _ROW_CHUNK - 1) // _ROW_CHUNK
    partial = np.zeros((batch * n_sr * chunks, n_sc, 3), np.float32)  # zeros: what an empty group reduces to
    for t in prange(batch * n_sr * chunks):
        b, i, ch = t // (n_sr * chunks), (t // chunks) % n_sr, t % chunks
        first = i * gr + ch * _ROW_CHUNK
        row = np.empty(k, np.float32)
        for mr in range(first, min(first + _ROW_CHUNK, i * gr + gr, m)):
            _load_row(x, b * m + mr, row)
            for c in range(n_sc):
                amax, lo, hi = _group_stats(row, c * gc, min(c * gc + gc, k), zero_point)
                partial[t, c, 0] = _max_nan(amax, partial[t, c, 0])
                partial[t, c, 1] = _min_nan(lo, partial[t, c, 1])
                partial[t, c, 2] = _max_nan(hi, partial[t, c, 2])
    for g in prange(batch * n_sr):
        b, i = g // n_sr, g % n_sr
        for c in range(n_sc):
            amax, lo, hi = F32(0.0), F32(0.0), F32(0.0)
            for t in range(g * chunks, g * chunks + chunks):
                amax = _max_nan(partial[t, c, 0], amax)
                lo = _min_nan(partial[t, c, 1], lo)
                hi = _max_nan(partial[t, c, 2], hi)
            d, s, u, o = _group_scale(mode, amax, lo, hi, fmax, F32(1.0))
            divisors[b, i, c], offsets[b, i, c], scale_f32[b, i, c], scale_u8[b, i, c] = d, o, s, u


def _per_group(shape, scale_f32=None, scale_u8=None):
    """Per-group arrays [B, SR, SC] for the kernels: divisors, code offsets, and where the float32
    scales and uint8 codes (E8M0, e4m3, zero points) go (scratch when the op does not return them)."""
    batch = math.prod(shape[:-2])
    shape3 = (batch, *shape[-2:])
    f32 = np.empty(shape3, np.float32) if scale_f32 is None else scale_f32.reshape(shape3)
    u8 = np.empty(shape3, np.uint8) if scale_u8 is None else scale_u8.view(np.uint8).reshape(shape3)
    return np.empty(shape3, np.float32), np.zeros(shape3, np.int64), f32, u8


def quantize(outs, x, fmt, granularity, group_size, zero_point):
    m, k = x.shape[-2:]
    x2 = as_rows(x, k)
    fp4 = fmt in ("mxfp4", "nvfp4")
    tensor_scales = np.ones(math.prod(x.shape[:-2]), np.float32)
    if fmt == "nvfp4":  # the tensor scale first: amax / (448 * 6) per leading index is the symmetric rule
        ts = _per_group(outs[2].shape, scale_f32=outs[2])
        _block_scales(x2, m, max(m, 1), k, False, SYMMETRIC, F32(448.0 * 6.0), *ts)
        tensor_scales = ts[2].reshape(-1)
    if fp4:
        mode, fmax, arrays = (MXFP4 if fmt == "mxfp4" else NVFP4), F32(0.0), _per_group(outs[1].shape, scale_u8=outs[1])
    elif zero_point:
        mode, fmax, arrays = ZERO_POINT, F32(0.0), _per_group(outs[1].shape, outs[1], outs[2])
    else:
        mode, fmax, arrays = SYMMETRIC, F32(F.FORMATS[fmt].max), _per_group(outs[1].shape, scale_f32=outs[1])
    gr, gc = F.group_tile(granularity, m, k, group_size)
    if gr > 1 or m == 0:  # groups spanning rows; with no rows, tensor and channel scales are still 1
        _block_scales(x2, m, gr, gc, zero_point, mode, fmax, *arrays)
    if x2.shape[0]:
        p = _element_params("e2m1" if fp4 else "uint4" if zero_point else fmt)
        _quantize_rows(x2, m, gr, gc, gr == 1, mode, fmax, p, tensor_scales, *arrays, outs[0].reshape(x2.shape[0], -1).view(np.uint8))


# ---------------------------------------------------------------- dequantize


def _value_table(fmt, zeros):
    """float32 value of every code (every byte; every nibble for the packed formats)."""
    element = "e2m1" if fmt in ("mxfp4", "nvfp4") else "uint4" if fmt == "int4" and zeros is not None else fmt
    return F.code_values(element).astype(np.float32)


@njit(**KERNEL)
def _dequantize_rows(q, table, m, gr, gc, scales, zeros, out):
    """out[r, j] = (table[code] - zero) * scale for q [B*M, K] bytes or [B*M, K/2] nibble pairs."""
    rows, k = out.shape
    packed = q.shape[1] != k
    for r in prange(rows):
        b, i = r // m, (r % m) // gr
        row = np.empty(k, np.float32)  # values first, then one narrowing loop: both vectorize
        if packed:
            for j in range(k):
                row[j] = table[(q[r, j >> 1] >> ((j & 1) * 4)) & 0xF]
        else:
            for j in range(k):
                row[j] = table[q[r, j]]
        for c in range((k + gc - 1) // gc):
            s = scales[b, i, c]
            z = F32(0.0) if zeros is None else F32(zeros[b, i, c])
            for j in range(c * gc, min(c * gc + gc, k)):
                row[j] = (row[j] - z) * s
        for j in range(k):
            store(out, (r, j), row[j])


def dequantize(outs, q, scales, fmt, granularity, zeros, tensor_scale, group_size, out_dtype):
    out = outs[0]
    m, k = out.shape[-2:]
    rows = math.prod(out.shape[:-1])
    if rows == 0:
        return
    batch = rows // m
    s = F.scale_values(fmt, scales, tensor_scale).astype(np.float32)  # a fresh contiguous array
    z = None if zeros is None else zeros.reshape(batch, *zeros.shape[-2:])
    gr, gc = F.group_tile(granularity, m, k, group_size)
    _dequantize_rows(q.reshape(rows, -1).view(np.uint8), _value_table(fmt, zeros), m, gr, gc,
                     s.reshape(batch, *s.shape[-2:]), z, as_rows(out, k))


def encode(x, fmt):
    """Codes of float32 values in hal.formats format `fmt` by the kernels' element conversion (for tests)."""
    x = np.ascontiguousarray(x, np.float32)
    codes = np.empty(x.shape, np.uint8)
    _encode_array(x.reshape(-1), _element_params(fmt), codes.reshape(-1))
    return codes.view(np.int8) if fmt == "int8" else codes & (0xF if F.FORMATS[fmt].bits == 4 else 0xFF)


@njit(**KERNEL)
def _encode_array(x, p, codes):
    for i in prange(x.shape[0]):
        codes[i] = _encode_float(x[i], p) if p[0] else _encode_int(x[i], p[8], p[9]) & 0xFF


KERNELS = (Kernel("quantize", quantize), Kernel("dequantize", dequantize, _Q_DTYPES))
