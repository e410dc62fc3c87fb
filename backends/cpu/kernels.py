"""CPU kernels: Numba loops, parallel over rows, computing in float32 whatever the storage dtype.

Numba has no float16 / bfloat16 arithmetic, so the public functions hand the compiled code
integer views of such arrays: float16 as ``uint16`` and bfloat16 as ``int16``. The integer type
is what tells a compiled specialization which format it holds; ``_ld`` widens an element to
float32 and ``_st`` narrows a float32 into one (round to nearest even), chosen at compile time
from the array's dtype, so each op has one kernel body for every mix of dtypes.

This module imports only numpy, numba (and its llvmlite), ml_dtypes and math so it can be tested on its own.
"""
import math

import llvmlite.binding as llvm
import ml_dtypes
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

_F32 = np.float32
_U32 = np.uint32
# Reductions may be reordered (so they vectorize) and mul+add fused; never nnan/ninf: inputs hold inf.
_FM = {"contract", "reassoc"}
_KERNEL = dict(parallel=True, cache=True, fastmath=_FM, error_model="numpy")
# Scalar helpers: no reassociation (the exp and float16 rounding tricks rely on exact IEEE adds).
_HELPER = dict(cache=True, fastmath={"contract"}, error_model="numpy")


# ---------------------------------------------------------------- bit casts and dtype conversion

@intrinsic
def _f32_bits(typingctx, x):
    """The bits of a float32 as uint32 (an LLVM bitcast: free)."""
    if x != types.float32:
        return None

    def codegen(context, builder, sig, args):
        return builder.bitcast(args[0], context.get_value_type(types.uint32))

    return types.uint32(x), codegen


@intrinsic
def _bits_f32(typingctx, x):
    """The float32 whose bits are the low 32 bits of integer x."""
    if not isinstance(x, types.Integer):
        return None

    def codegen(context, builder, sig, args):
        i32 = context.get_value_type(types.uint32)
        v = args[0]
        if x.bitwidth > 32:
            v = builder.trunc(v, i32)
        elif x.bitwidth < 32:
            v = builder.zext(v, i32)
        return builder.bitcast(v, context.get_value_type(types.float32))

    return types.float32(x), codegen


# Exact float16 -> float32 table, built once at import (Numba embeds it as a constant).
_F16_TO_F32 = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32)
_HAS_F16C = "f16c" in llvm.get_host_cpu_features().flatten()


@intrinsic
def _f16_f32(typingctx, x):
    """float16 bits (uint16) -> float32 as an LLVM fpext from half: exact (a signalling NaN comes
    back quiet); only used when the host has F16C, else LLVM would call a runtime helper."""
    if x != types.uint16:
        return None

    def codegen(context, builder, sig, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(x), codegen


@njit(**_HELPER)
def _f32_to_f16(f):
    """float32 -> float16 bits, round to nearest even; overflow -> inf, NaN stays a (quiet) NaN."""
    x = _f32_bits(f)
    sign = (x >> _U32(16)) & _U32(0x8000)
    x &= _U32(0x7FFFFFFF)
    if x >= _U32(0x47800000):  # |f| >= 2**16 (rounds to inf), inf or NaN
        h = _U32(0x7C00)
        if x > _U32(0x7F800000):  # NaN: set the quiet bit, keep the top payload bits
            h |= _U32(0x200) | ((x >> _U32(13)) & _U32(0x3FF))
    elif x < _U32(0x38800000):  # |f| < 2**-14: float16 subnormal or zero
        # Adding 0.5 lines the 2**-24 units up with the float32 mantissa's low bits; the FPU rounds
        # to nearest even and a carry into bit 10 correctly yields the smallest normal.
        h = _f32_bits(_bits_f32(x) + _F32(0.5)) - _U32(0x3F000000)
    else:  # normal: rebias the exponent, add 0xFFF + odd bit = round half to even, drop 13 bits
        h = (x + _U32(0xC8000FFF) + ((x >> _U32(13)) & _U32(1))) >> _U32(13)
    return np.uint16(h | sign)


@njit(**_HELPER)
def _f32_to_bf16(f):
    """float32 -> bfloat16 bits (as int16), round to nearest even; NaN stays a (quiet) NaN."""
    x = _f32_bits(f)
    if (x & _U32(0x7FFFFFFF)) > _U32(0x7F800000):
        return np.int16(np.uint16((x >> _U32(16)) | _U32(0x40)))
    # Carries into the exponent give the right answer, including overflow to inf.
    return np.int16(np.uint16((x + _U32(0x7FFF) + ((x >> _U32(16)) & _U32(1))) >> _U32(16)))


def _ld(a, i):
    """a[i] as float32, for a float32, float16 (uint16 view) or bfloat16 (int16 view) array."""


def _st(a, i, v):
    """a[i] = float32 v, narrowed to the array's format."""


@overload(_ld, jit_options=_HELPER)
def _ld_impl(a, i):
    if a.dtype == types.float32:
        return lambda a, i: a[i]
    if a.dtype == types.uint16:
        if _HAS_F16C:  # one vcvtph2ps per vector instead of a gather from the table
            return lambda a, i: _f16_f32(a[i])
        return lambda a, i: _F16_TO_F32[a[i]]
    if a.dtype == types.int16:  # bfloat16 is the top half of a float32: a shift is exact
        return lambda a, i: _bits_f32(_U32(np.uint16(a[i])) << _U32(16))
    return None


@overload(_st, jit_options=_HELPER)
def _st_impl(a, i, v):
    if a.dtype == types.float32:
        def st(a, i, v):
            a[i] = v
    elif a.dtype == types.uint16:
        def st(a, i, v):
            a[i] = _f32_to_f16(v)
    elif a.dtype == types.int16:
        def st(a, i, v):
            a[i] = _f32_to_bf16(v)
    else:
        return None
    return st


_BF16 = np.dtype(ml_dtypes.bfloat16)


def _raw(a):
    """The array Numba sees: float32 as is, float16 as uint16, bfloat16 as int16 (None passes)."""
    if a is None or a.dtype == np.float32:
        return a
    if a.dtype == np.float16:
        return a.view(np.uint16)
    if a.dtype == _BF16:
        return a.view(np.int16)
    raise TypeError(f"cpu kernels take float32, float16 or bfloat16 tensors, not {a.dtype}")


def _rows(a, n):
    """A C-contiguous tensor [..., n] as a 2-D [rows, n] raw view (works for empty tensors)."""
    if a is None:
        return None
    return _raw(a).reshape(math.prod(a.shape[:-1]), n)


# ---------------------------------------------------------------- vectorizable float32 math

_LOG2E = _F32(1.4426950408889634)
_LN2_HI = _F32(0.693359375)  # Cody-Waite split of ln 2: n * _LN2_HI is exact for |n| <= 2**9
_LN2_LO = _F32(-2.12194440e-4)
_ROUND = _F32(12582912.0)  # 1.5 * 2**23: adding it rounds to an integer held in the low bits
_ROUND_BITS = 0x4B400000


@njit(**_HELPER)
def _exp(x):
    """exp for float32 in straight-line code (Cephes polynomial, ~1 ulp) so loops vectorize.

    Subnormal results and overflow to inf are right; NaN propagates.
    """
    x = _F32(-104.0) if x < _F32(-104.0) else x  # exp(-104) rounds to 0; comparisons pass NaN
    x = _F32(89.0) if x > _F32(89.0) else x  # exp(89) overflows
    t = x * _LOG2E + _ROUND
    n = t - _ROUND
    r = x - n * _LN2_HI - n * _LN2_LO
    p = _F32(1.9875691500e-4)
    p = p * r + _F32(1.3981999507e-3)
    p = p * r + _F32(8.3334519073e-3)
    p = p * r + _F32(4.1665795894e-2)
    p = p * r + _F32(1.6666665459e-1)
    p = p * r + _F32(5.0000001201e-1)
    p = p * r * r + r + _F32(1.0)
    # Scale by 2**n as 2**h * 2**(n-h): both factors stay normal for n in [-151, 128].
    ni = np.int32(_f32_bits(t)) - np.int32(_ROUND_BITS)
    h = ni >> 1
    return p * _bits_f32((h + 127) << 23) * _bits_f32((ni - h + 127) << 23)


@njit(**_HELPER)
def _silu(x):
    return x / (_F32(1.0) + _exp(-x))


@njit(**_HELPER)
def _gelu_tanh(x):
    # 0.5 x (1 + tanh(u)) == x * sigmoid(2u): no cancellation for negative x.
    u = _F32(0.7978845608028654) * (x + _F32(0.044715) * x * x * x)
    return x / (_F32(1.0) + _exp(_F32(-2.0) * u))


@njit(**_HELPER)
def _gelu(x):
    # x * Phi(x) with Phi from erfc(|x|/sqrt2) (Numerical Recipes erfcc: relative error < 1.2e-7
    # everywhere, so the negative tail stays accurate rather than 1 + erf cancelling).
    z = abs(x) * _F32(0.7071067811865476)
    t = _F32(1.0) / (_F32(1.0) + _F32(0.5) * z)
    p = _F32(0.17087277)
    p = p * t + _F32(-0.82215223)
    p = p * t + _F32(1.48851587)
    p = p * t + _F32(-1.13520398)
    p = p * t + _F32(0.27886807)
    p = p * t + _F32(-0.18628806)
    p = p * t + _F32(0.09678418)
    p = p * t + _F32(0.37409196)
    p = p * t + _F32(1.00002368)
    p = p * t + _F32(-1.26551223)
    half_erfc = _F32(0.5) * t * _exp(p - z * z)
    return x * (_F32(1.0) - half_erfc if x >= _F32(0.0) else half_erfc)


_ACTIVATIONS = {None: 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4}


@njit(**_HELPER)
def _activate(v, act):
    if act == 1:
        return _F32(0.0) if v < _F32(0.0) else v  # relu keeps NaN, like torch
    if act == 2:
        return _gelu(v)
    if act == 3:
        return _gelu_tanh(v)
    if act == 4:
        return _silu(v)
    return v


# ---------------------------------------------------------------- kernels

@njit(cache=True, fastmath=_FM, error_model="numpy")
def _load_row(x, res, s_out, r, buf):
    """buf = x[r] (+ res[r]) in float32, also stored to s_out[r] with a residual; returns sum(buf)."""
    acc = _F32(0.0)
    for j in range(buf.shape[0]):
        v = _ld(x, (r, j))
        if res is not None:
            v += _ld(res, (r, j))
            _st(s_out, (r, j), v)
        buf[j] = v
        acc += v
    return acc


@njit(**_KERNEL)
def _rms_norm_kernel(x, w, res, y, s_out, eps):
    rows, n = x.shape
    for r in prange(rows):
        buf = np.empty(n, np.float32)  # float32 scratch row, stays in cache between passes
        _load_row(x, res, s_out, r, buf)
        ss = _F32(0.0)
        for j in range(n):
            ss += buf[j] * buf[j]
        inv = _F32(1.0) / np.sqrt(ss / _F32(n) + eps)
        for j in range(n):
            _st(y, (r, j), buf[j] * inv * _ld(w, j))


@njit(**_KERNEL)
def _layer_norm_kernel(x, w, b, res, y, s_out, eps):
    rows, n = x.shape
    for r in prange(rows):
        buf = np.empty(n, np.float32)  # float32 scratch row, stays in cache between passes
        mean = _load_row(x, res, s_out, r, buf) / _F32(n)
        var = _F32(0.0)  # two-pass (centered) variance over the cached row: no cancellation
        for j in range(n):
            d = buf[j] - mean
            var += d * d
        inv = _F32(1.0) / np.sqrt(var / _F32(n) + eps)
        for j in range(n):
            v = (buf[j] - mean) * inv * _ld(w, j)
            if b is not None:
                v += _ld(b, j)
            _st(y, (r, j), v)


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _row_max(buf):
    """max(buf) ignoring NaN (a NaN still makes its softmax row NaN through exp). Kept in 16
    independent lanes: LLVM will not vectorize a float max reduction without nnan."""
    n = buf.shape[0]
    n16 = n - n % 16
    lanes = np.full(16, -np.inf, np.float32)
    for j0 in range(0, n16, 16):
        for lane in range(16):
            v = buf[j0 + lane]
            lanes[lane] = v if v > lanes[lane] else lanes[lane]
    m = _F32(-np.inf)
    for j in range(n16, n):
        m = buf[j] if buf[j] > m else m
    for lane in range(16):
        m = lanes[lane] if lanes[lane] > m else m
    return m


@njit(**_KERNEL)
def _softmax_rows_kernel(x, y):
    """Softmax over the last, contiguous axis of x [rows, n]: max, exp + sum into a cached
    float32 row, scale; one exp per element."""
    rows, n = x.shape
    for r in prange(rows):
        buf = np.empty(n, np.float32)  # float32 scratch row, stays in cache between passes
        for j in range(n):
            buf[j] = _ld(x, (r, j))
        m = _row_max(buf)
        # A row of -inf gives (-inf) - (-inf) = NaN everywhere, like torch.
        s = _F32(0.0)
        for j in range(n):
            e = _exp(buf[j] - m)
            buf[j] = e
            s += e
        inv = _F32(1.0) / s
        for j in range(n):
            _st(y, (r, j), buf[j] * inv)


# Column-wise steps of the strided softmax on contiguous 1-D slices (which LLVM vectorizes,
# unlike the same loops written with 3-D indices).
@njit(cache=True, fastmath=_FM, error_model="numpy")
def _max_into(x, m):
    for i in range(m.shape[0]):
        v = _ld(x, i)
        m[i] = v if v > m[i] else m[i]


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _sum_exp_into(x, m, s):
    for i in range(m.shape[0]):
        s[i] += _exp(_ld(x, i) - m[i])


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _write_exp(x, m, inv, y):
    for i in range(m.shape[0]):
        _st(y, i, _exp(_ld(x, i) - m[i]) * inv[i])


@njit(**_KERNEL)
def _softmax_strided_kernel(x, y, block):
    """Softmax over axis 1 of x [outer, n, inner]: blocks of `block` contiguous inner columns,
    each reduced down the n axis in three passes (max, sum of exp, write) over a block sized
    to stay in L2, so only the first pass reads memory."""
    outer, n, inner = x.shape
    blocks = (inner + block - 1) // block
    for task in prange(outer * blocks):
        o = task // blocks
        i0 = (task % blocks) * block
        w = min(block, inner - i0)
        m = np.full(w, -np.inf, np.float32)
        s = np.zeros(w, np.float32)
        for j in range(n):
            _max_into(x[o, j, i0:i0 + w], m)
        for j in range(n):
            _sum_exp_into(x[o, j, i0:i0 + w], m, s)
        for i in range(w):
            s[i] = _F32(1.0) / s[i]
        for j in range(n):
            _write_exp(x[o, j, i0:i0 + w], m, s, y[o, j, i0:i0 + w])


@njit(**_KERNEL)
def _silu_and_mul_kernel(x, y):
    rows, d = y.shape
    for r in prange(rows):
        for j in range(d):
            _st(y, (r, j), _silu(_ld(x, (r, j))) * _ld(x, (r, j + d)))


@njit(**_HELPER)
def _rotate(x, out, t, h, i1, i2, c, s):
    x1 = _ld(x, (t, h, i1))
    x2 = _ld(x, (t, h, i2))
    _st(out, (t, h, i1), x1 * c - x2 * s)
    _st(out, (t, h, i2), x2 * c + x1 * s)


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _rope_token(x, out, t, c, s, interleaved, rotary_dim):
    """Rotate every head of token t of x [T, H, D] with the float32 cos/sin row c, s."""
    half = rotary_dim // 2
    for h in range(x.shape[1]):
        # GPT-J pairs neighbours (2i, 2i+1), NeoX the two halves (i, i + half). One loop per
        # layout: constant strides let LLVM vectorize each (a per-element choice did not).
        if interleaved:
            for i in range(half):
                _rotate(x, out, t, h, 2 * i, 2 * i + 1, c[i], s[i])
        else:
            for i in range(half):
                _rotate(x, out, t, h, i, i + half, c[i], s[i])
        for j in range(rotary_dim, x.shape[2]):
            _st(out, (t, h, j), _ld(x, (t, h, j)))


@njit(**_KERNEL)
def _rope_kernel(q, k, cos, sin, positions, q_out, k_out, interleaved, rotary_dim):
    half = rotary_dim // 2
    for t in prange(q.shape[0]):
        c = np.empty(half, np.float32)  # the cos/sin row widened once per token, shared by all heads
        s = np.empty(half, np.float32)
        p = positions[t]
        for i in range(half):
            c[i] = _ld(cos, (p, i))
            s[i] = _ld(sin, (p, i))
        _rope_token(q, q_out, t, c, s, interleaved, rotary_dim)
        _rope_token(k, k_out, t, c, s, interleaved, rotary_dim)


@njit(**_KERNEL)
def _widen_kernel(src, dst):
    """dst[r, j] = float32(src[r, j]); src may be strided."""
    rows, cols = dst.shape
    for r in prange(rows):
        for j in range(cols):
            dst[r, j] = _ld(src, (r, j))


@njit(**_HELPER)
def _epilogue(v, out, bias, c, alpha, beta, act, r, j):
    """out[r, j] = act(alpha * v + bias[j]) + beta * c[r, j], v the float32 accumulator."""
    v *= alpha
    if bias is not None:
        v += _ld(bias, j)
    v = _activate(v, act)
    if c is not None:
        v += beta * _ld(c, (r, j))
    _st(out, (r, j), v)


@njit(**_KERNEL)
def _gemm_epilogue_kernel(acc, out, bias, c, alpha, beta, act):
    """out = act(alpha * acc + bias) + beta * c in one pass; acc may be out itself (float32)."""
    rows, cols = out.shape
    for r in prange(rows):
        for j in range(cols):
            _epilogue(acc[r, j], out, bias, c, alpha, beta, act, r, j)


# Inner loops of the small-M gemm on contiguous 1-D slices, so LLVM vectorizes them.
@njit(cache=True, fastmath=_FM, error_model="numpy")
def _widen_into(src, dst):
    for i in range(dst.shape[0]):
        dst[i] = _ld(src, i)


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _axpy4(s, r, y):
    """y += s[0] * r[0] + ... + s[3] * r[3]: four rows of b per pass over the accumulator row,
    which keeps the loop from being bound by its loads and stores of y."""
    s0, s1, s2, s3 = s[0], s[1], s[2], s[3]
    r0, r1, r2, r3 = r[0], r[1], r[2], r[3]
    for j in range(y.shape[0]):
        y[j] += s0 * r0[j] + s1 * r1[j] + s2 * r2[j] + s3 * r3[j]


@njit(cache=True, fastmath=_FM, error_model="numpy")
def _dot4(x, c):
    """x . c[0], ..., x . c[3]: four columns of b per pass over the row x of a."""
    s0 = s1 = s2 = s3 = _F32(0.0)
    c0, c1, c2, c3 = c[0], c[1], c[2], c[3]
    for p in range(x.shape[0]):
        s0 += x[p] * c0[p]
        s1 += x[p] * c1[p]
        s2 += x[p] * c2[p]
        s3 += x[p] * c3[p]
    return s0, s1, s2, s3


@njit(**_KERNEL)
def _gemm_small_m_kernel(a, b, ld, trans, out, bias, c, alpha, beta, act, block):
    """gemm for a few rows: a [M, K] float32 (contiguous), b [K, N] read once in its own format
    from the flat raw buffer b (element [p, j] at p * ld + j, or at j * ld + p if trans), parallel
    over blocks of `block` columns of N. Four rows (columns if trans) of b at a time are widened
    into a float32 buffer and used by all M rows of a; float32 accumulation, fused epilogue."""
    m, k = a.shape
    n = out.shape[1]
    for blk in prange((n + block - 1) // block):
        j0 = blk * block
        w = min(block, n - j0)
        acc = np.zeros((m, w), np.float32)
        if trans:  # columns of b contiguous: dot products with the rows of a
            buf = np.zeros((4, k), np.float32)
            for j in range(0, w, 4):
                q4 = min(4, w - j)
                for q in range(q4):
                    base = (j0 + j + q) * ld
                    _widen_into(b[base:base + k], buf[q])
                for i in range(m):
                    d = _dot4(a[i], buf)
                    for q in range(q4):
                        acc[i, j + q] = d[q]
        else:  # rows of b contiguous: acc[i] += a[i, p] * b[p, j0:j0 + w]
            buf = np.empty((4, w), np.float32)
            s = np.zeros(4, np.float32)  # s[p4:] stays 0 in the K % 4 tail
            for p in range(0, k, 4):
                p4 = min(4, k - p)
                for q in range(p4):
                    base = (p + q) * ld + j0
                    _widen_into(b[base:base + w], buf[q])
                buf[p4:] = 0  # K % 4 tail: zero terms (stale rows could hold inf: 0 * inf = NaN)
                for i in range(m):
                    for q in range(p4):
                        s[q] = a[i, p + q]
                    _axpy4(s, buf, acc[i])
        for i in range(m):
            for j in range(w):
                _epilogue(acc[i, j], out, bias, c, alpha, beta, act, i, j0 + j)


# ---------------------------------------------------------------- public entry points

def _as_f32(a):
    """A float32 version of a 2-D tensor for BLAS, keeping a transposed layout contiguous."""
    if a.dtype == np.float32:
        return a
    if a.flags.f_contiguous and not a.flags.c_contiguous:
        return _as_f32(a.T).T
    dst = np.empty(a.shape, np.float32)
    _widen_kernel(_raw(a), dst)
    return dst


def _flat(b):
    """b [K, N] as (flat raw 1-D view, leading dimension, transposed) when its rows or its columns
    are contiguous with non-negative strides (row-major, column-major, or a slice of either), else None."""
    raw = _raw(b)
    (k, n), size = raw.shape, raw.itemsize
    s0, s1 = raw.strides[0] // size, raw.strides[1] // size
    if raw.flags.c_contiguous or raw.flags.f_contiguous:  # strides of length-1 axes may be anything
        s0, s1 = (n, 1) if raw.flags.c_contiguous else (1, k)
    if min(s0, s1) < 0 or raw.strides[0] % size or raw.strides[1] % size:
        return None
    if s1 == 1:
        trans, ld = False, s0
    elif s0 == 1:
        trans, ld = True, s1
    else:
        return None
    span = (k - 1) * s0 + (n - 1) * s1 + 1 if k and n else 0
    return np.lib.stride_tricks.as_strided(raw, (span,), (size,), writeable=False), ld, trans


# Largest M that takes the small-M kernel (b read once in its own format) instead of widening b
# to float32 for BLAS. Measured on 2 AVX-512 cores, K x N = 2048 x 3072 / 5632 x 2048: bfloat16
# M = 1 / 16 took 0.3 / 2 ms against ~8 ms for widen + BLAS; past M ~ 24 BLAS catches up. float32
# stays on BLAS: OpenBLAS's gemv/gemm is as fast or faster there (M = 1: 0.24 vs 0.6 ms).
_SMALL_M = {np.dtype(np.float32): 0, np.dtype(np.float16): 16, _BF16: 16}
# Columns of N per task (measured): row-major b reads 2-4 KB runs of each row (shorter ones ran
# slower), the [M, block] accumulator stays in L2; transposed b needs only a few columns per task.
_SMALL_M_BLOCK = 1024
_SMALL_M_BLOCK_T = 64


def gemm(outs, a, b, bias, c, *, activation, alpha, beta, out_dtype=None):
    """out = act(alpha * (a @ b) + bias) + beta * c; the matmul core is float32 BLAS (out_dtype is outs[0].dtype),
    or for a few rows of a a Numba kernel that reads b once in its own format."""
    (out,) = outs
    act = _ACTIVATIONS[activation]
    m = a.shape[0]
    flat = _flat(b) if 0 < m <= _SMALL_M.get(b.dtype, 0) else None
    if flat is not None:
        a32 = np.ascontiguousarray(_as_f32(a))
        block = _SMALL_M_BLOCK_T if flat[2] else _SMALL_M_BLOCK
        _gemm_small_m_kernel(a32, flat[0], flat[1], flat[2], _raw(out), _raw(bias), _raw(c), _F32(alpha), _F32(beta),
                             act, block)
        return
    a32, b32 = _as_f32(a), _as_f32(b)
    if out.dtype == np.float32:
        np.matmul(a32, b32, out=out)
        if act == 0 and alpha == 1 and bias is None and c is None:
            return
        acc = out  # epilogue in place
    else:
        acc = np.matmul(a32, b32)
    _gemm_epilogue_kernel(acc, _raw(out), _raw(bias), _raw(c), _F32(alpha), _F32(beta), act)


_SOFTMAX_L2_BYTES = 1 << 18  # float32 bytes of one strided-softmax block (x rows * columns)


def softmax(outs, x, *, dim):
    """Softmax of x along dim (a non-negative int)."""
    (y,) = outs
    outer, n, inner = math.prod(x.shape[:dim]), x.shape[dim], math.prod(x.shape[dim + 1:])
    if inner == 1:
        _softmax_rows_kernel(_raw(x).reshape(outer, n), _raw(y).reshape(outer, n))
    else:
        block = min(inner, max(16, _SOFTMAX_L2_BYTES // (4 * max(n, 1)) // 16 * 16))
        _softmax_strided_kernel(_raw(x).reshape(outer, n, inner), _raw(y).reshape(outer, n, inner), block)


def rms_norm(outs, x, weight, residual, *, eps):
    """y = s / sqrt(mean(s^2) + eps) * weight with s = x (+ residual); outs = (y,) or (y, s)."""
    n = x.shape[-1]
    s_out = outs[1] if residual is not None else None
    _rms_norm_kernel(_rows(x, n), _raw(weight), _rows(residual, n), _rows(outs[0], n),
                     _rows(s_out, n), _F32(eps))


def layer_norm(outs, x, weight, bias, residual, *, eps):
    """y = (s - mean) / sqrt(var + eps) * weight + bias with s = x (+ residual); outs = (y,) or (y, s)."""
    n = x.shape[-1]
    s_out = outs[1] if residual is not None else None
    _layer_norm_kernel(_rows(x, n), _raw(weight), _raw(bias), _rows(residual, n),
                       _rows(outs[0], n), _rows(s_out, n), _F32(eps))


def silu_and_mul(outs, x):
    """out[..., d] = silu(x[..., :d]) * x[..., d:]."""
    (y,) = outs
    d = y.shape[-1]
    _silu_and_mul_kernel(_rows(x, 2 * d), _rows(y, d))


def rope(outs, q, k, cos, sin, positions, *, interleaved, rotary_dim):
    """Rotary embedding of q [T, Hq, D] and k [T, Hk, D] at the given positions."""
    q_out, k_out = outs
    _rope_kernel(_raw(q), _raw(k), _raw(cos), _raw(sin), positions, _raw(q_out), _raw(k_out),
                 bool(interleaved), int(rotary_dim))
