"""CPU kernels: quantized GEMMs, out = epilogue(x @ dequantized(b).T) with b [N, K] in a low-precision format.

A weight row is dequantized to float32 by `_decode_row`: each code is looked up in a small float32
table (fp8: 256 entries, 4-bit formats: 16) and times its group's scale, one rounding with exactly
that group's scale. What the rows are then multiplied with depends on M:

- a few rows of activations (decode): one parallel Numba loop reads each weight once in its own
  format, widens four rows at a time into an L1-resident buffer and takes their dot products with
  every activation row; no float32 copy of the weights exists.
- many rows: the weights are dequantized a panel of rows at a time and multiplied with float32 BLAS
  (NumPy matmul), so memory holds one panel, not a float32 copy of the whole weight. The panel
  dequantization runs on one thread: a Numba parallel region between two BLAS calls would wait for
  cores that BLAS's idle threads are still spinning on (measured: 0.1 ms of work took 50 ms).

Both write an fp32 (int32 for int8) accumulator [M, N]; one parallel epilogue then scales, adds,
applies the activation (plain or gated, hal.codes) and rounds to the output dtype.

fp8 GEMMs (fp8_gemm_blockscale is the grouped kernel with one expert) take AMX tiles where gemm_core's
rung is "amx": fp8 values are exact in bfloat16, so the tiles multiply the codes exactly, and each
128-K block's fp32 sum is promoted literally (times its two scales, added in fp32), with no BLAS call
and no float32 copy of the weights (a task converts its 128 weight rows into an L2 buffer). Elsewhere
the block scales are applied to both operands before the product, so DeepSeek's promotion folds into
the ordinary fp32 accumulation of scaled values (equal up to rounding, which the reference's tolerance
allows). Scales that are inf or NaN take a literal per-block path in NumPy, whose results differ (see
_fp8_promoted). int8 products are integers: fp32 arithmetic is exact on them while
every partial sum stays within 2^24, which K chunks of 1024 guarantee (1024 * 128 * 128 = 2^24);
the chunks' sums are added in int32.
"""
from collections import namedtuple

import numpy as np
from numba import njit, prange, types
from numba.extending import overload

from hal import formats as F
from hal.codes import activation_code
from hal.dtypes import FLOATS
from hal.ops.moe import masked_counts
from hal.ops.qgemm import FP8

from .common import F32, FASTMATH, HELPER, KERNEL, Kernel, activate_row, as_f32, dot4, load, outside_segments, raw_view, store
from . import gemm_core
from .gemm_core import _GROUP_ROWS, _GROUP_X, _amx_begin, _amx_end, _amx_tiles, _columns_epilogue, packed_q

BLOCK = 128  # fp8 scale block along K (and along N for the weights)
# Up to this many activation rows the small-M loop beats dequantize + BLAS. Measured on one AVX-512
# core, K x N = 2048 x 2048, fp8 / int8 / int4: M = 16 took 2.9 / 1.7 / 3.0 ms against 3.8 / 2.1 /
# 3.4 ms; at M = 32 they are even, and on two cores the small-M loop also has the panel decoding
# (one thread on the BLAS path) in parallel.
SMALL_M = 32
SMALL_M_COLUMNS = 64  # weight rows per task of the small-M loop (N / 64 tasks share the cores)
# Weight elements dequantized per BLAS call (16 MB of float32). Each call packs all of x again, so
# panels are made as wide as this allows: at M = 4096, K = 2048 (one core), eight 256-row panels
# took 10% longer than one 2048-row call.
PANEL_ELEMENTS = 1 << 22
INT8_EXACT_K = 1024  # K per fp32 product of int8 values: partial sums stay within 2^24

# Weights as the kernels see them (one namedtuple type per format, so `_decode_row` is chosen at compile time).
Fp8Rows = namedtuple("Fp8Rows", "codes scales rows_per_scale table")  # codes uint8 [R, K], scales [R / rows_per_scale, K / 128]
NibbleRows = namedtuple("NibbleRows", "packed table scales zeros group")  # packed uint8 [R, K / 2], scales / zeros [R, K / group]
Int8Rows = namedtuple("Int8Rows", "codes")  # int8 [R, K]

_FP8_TABLES = {fmt: F.code_values(fmt).astype(np.float32) for fmt in FP8}
_NIBBLE_TABLES = {fmt: F.code_values(fmt).astype(np.float32) for fmt in ("int4", "uint4", "e2m1")}  # int4 codes 8..15 are -8..-1


# ---------------------------------------------------------------- dequantizing one row


def _decode_row(w, r, dst):
    """dst [K] = float32 values of row r of the quantized rows w (Fp8Rows, NibbleRows or Int8Rows)."""


def _is(w, cls):
    return isinstance(w, types.BaseNamedTuple) and w.instance_class is cls


@overload(_decode_row, jit_options=HELPER)
def _decode_row_impl(w, r, dst):
    if _is(w, Fp8Rows):
        def decode(w, r, dst):
            s_row = w.scales[r // w.rows_per_scale]
            k = dst.shape[0]
            for k0 in range(0, k, BLOCK):
                s = s_row[k0 // BLOCK]
                for j in range(k0, min(k0 + BLOCK, k)):
                    dst[j] = w.table[w.codes[r, j]] * s
        return decode
    if _is(w, NibbleRows):
        def decode(w, r, dst):
            k, g = dst.shape[0], w.group
            for k0 in range(0, k, g):  # groups are even: no byte straddles two
                s, z = w.scales[r, k0 // g], F32(w.zeros[r, k0 // g])
                for j in range(k0 // 2, min(k0 + g, k) // 2):
                    byte = w.packed[r, j]  # low nibble first
                    dst[2 * j] = (w.table[byte & 15] - z) * s
                    dst[2 * j + 1] = (w.table[byte >> 4] - z) * s
        return decode
    if _is(w, Int8Rows):
        def decode(w, r, dst):
            for j in range(dst.shape[0]):
                dst[j] = F32(w.codes[r, j])
        return decode
    return None


@njit(**KERNEL)
def _dequantize_parallel(w, r0, dst):
    """dst[i] = row r0 + i, parallel over rows (activations, before any BLAS call)."""
    for i in prange(dst.shape[0]):
        _decode_row(w, r0 + i, dst[i])


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _dequantize(w, r0, dst):
    """dst[i] = row r0 + i on the calling thread (weight panels between BLAS calls)."""
    for i in range(dst.shape[0]):
        _decode_row(w, r0 + i, dst[i])


# ---------------------------------------------------------------- the product x @ dequantized(w).T


@njit(**KERNEL)
def _small_m_product(x, w, acc, k_chunk):
    """acc [M, R] = x [M, K] @ rows of w, for a few rows x: parallel over blocks of weight rows, four
    rows widened at a time into a buffer that every row of x then uses. The dot products run over K
    chunks of k_chunk whose sums are added in acc's dtype (int32 keeps int8 products exact)."""
    m, k = x.shape
    n = acc.shape[1]
    for blk in prange((n + SMALL_M_COLUMNS - 1) // SMALL_M_COLUMNS):
        buf = np.empty((4, k), np.float32)  # past the last row, stale rows give products never stored
        for r in range(blk * SMALL_M_COLUMNS, min((blk + 1) * SMALL_M_COLUMNS, n), 4):
            q4 = min(4, n - r)
            for q in range(q4):
                _decode_row(w, r + q, buf[q])
            for i in range(m):
                for k0 in range(0, k, k_chunk):
                    k1 = min(k0 + k_chunk, k)
                    d = dot4(x[i, k0:k1], (buf[0, k0:k1], buf[1, k0:k1], buf[2, k0:k1], buf[3, k0:k1]))
                    for q in range(q4):
                        if k0 == 0:
                            acc[i, r + q] = d[q]
                        else:
                            acc[i, r + q] += d[q]


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _add_exact(part, total, first):
    """total (int32) = / += part (float32 holding exact integers), on the calling thread."""
    rows, cols = part.shape
    for i in range(rows):
        for j in range(cols):
            v = np.int32(part[i, j])
            total[i, j] = v if first else total[i, j] + v


def _product(x, w, acc, k_chunk):
    """acc [M, R] = x [M, K] float32 @ (the R rows of w, dequantized).T; k_chunk < K only for int8."""
    m, k = x.shape
    if m == 0 or acc.shape[1] == 0:
        return
    if k == 0:
        acc[:] = 0
    elif m <= SMALL_M:
        _small_m_product(x, w, acc, k_chunk)
    else:
        _blas_product(x, w, acc, k_chunk)


def _blas_product(x, w, acc, k_chunk):
    (m, k), n = x.shape, acc.shape[1]
    panel = min(n, max(BLOCK, PANEL_ELEMENTS // k))
    w_buf = np.empty((panel, k), np.float32)
    part = np.empty((m, panel), np.float32) if k_chunk < k or acc.dtype != np.float32 else None
    for r0 in range(0, n, panel):
        rows = min(panel, n - r0)
        wp = w_buf[:rows]
        _dequantize(w, r0, wp)
        if part is None:
            np.matmul(x, wp.T, out=acc[:, r0:r0 + rows])
            continue
        for k0 in range(0, k, k_chunk):
            p = part[:, :rows]
            np.matmul(x[:, k0:k0 + k_chunk], wp[:, k0:k0 + k_chunk].T, out=p)
            _add_exact(p, acc[:, r0:r0 + rows], k0 == 0)


# ---------------------------------------------------------------- epilogues: accumulator to out


@njit(**KERNEL)
def _store(acc, out, act):
    """out = act(acc) rounded to out's format (acc activated in place; it may be out itself)."""
    rows, cols = out.shape
    for i in prange(rows):
        activate_row(acc[i], cols, act)
        for j in range(cols):
            store(out, (i, j), acc[i, j])


@njit(**KERNEL)
def _store_gated(acc, out, act):
    """out = act(acc[:, :N]) * acc[:, N:] in fp32, rounded once (the gate half activated in place)."""
    rows, n = out.shape
    for i in prange(rows):
        activate_row(acc[i], n, act)
        for j in range(n):
            store(out, (i, j), acc[i, j] * acc[i, n + j])


@njit(**KERNEL)
def _store_int8(acc, out, a_scales, b_scales, bias):
    """out = float32(acc) * a_scales[i] * b_scales[j] + bias[j], acc the exact int32 products."""
    rows, cols = out.shape
    for i in prange(rows):
        sa = a_scales[i]
        for j in range(cols):
            v = F32(acc[i, j]) * sa * b_scales[j]
            if bias is not None:
                v += load(bias, j)
            store(out, (i, j), v)


def _accumulator(out, gated):
    """The fp32 accumulator [M, N] (gate and up: [M, 2N]) for out; a float32 out without a gate is its own."""
    if out.dtype == np.float32 and not gated:
        return out
    return np.empty((out.shape[0], out.shape[1] * (2 if gated else 1)), np.float32)


def _finish(acc, out, act=0, gated=False):
    """out = the epilogue of the accumulator (activation code `act`, gated or not), rounded once."""
    if gated:
        _store_gated(acc, raw_view(out), act)
    elif acc is not out or act:
        _store(acc, raw_view(out), act)


def _float_gemm(out, x, w):
    """out = x @ w.T, w the quantized weight rows."""
    acc = _accumulator(out, False)
    _product(x, w, acc, x.shape[1])
    _finish(acc, out)


# ---------------------------------------------------------------- public kernels


def _fp8_activations(a, a_scales, table):
    x = np.empty(a.shape, np.float32)
    _dequantize_parallel(Fp8Rows(a.view(np.uint8), a_scales, 1, table), 0, x)
    return x


def _fp8_promoted(acc, a, a_scales, codes, b_scales, table):
    """acc = the sum over 128-K blocks of (a_blk @ b_blk.T) * (a_scale * b_scale): DeepSeek's promotion
    taken literally, for scales that are not all finite. Scaling the operands first (the fast path)
    would turn an inf scale into inf * 0 = NaN products, where the rule wants +-inf unless the block's
    partial sum is 0. Rare, so plain NumPy: one float32 matmul per block."""
    x, w = table[a.view(np.uint8)], table[codes]
    sb = np.repeat(b_scales, BLOCK, axis=0)[: w.shape[0]]  # per weight row
    acc[:] = 0
    with np.errstate(invalid="ignore", over="ignore"):  # inf * 0 = NaN is the answer here
        for kb in range(a_scales.shape[1]):
            blk = slice(kb * BLOCK, (kb + 1) * BLOCK)
            acc += (x[:, blk] @ w[:, blk].T) * (a_scales[:, kb:kb + 1] * sb[:, kb])


def fp8_gemm_blockscale(outs, a, a_scales, b, b_scales, *, out_dtype):
    """out = (a * a_scales) @ (b * b_scales).T, scales per token per 128 K and per 128 x 128 weight block:
    the grouped kernel with one expert."""
    _fp8_grouped(outs[0], a, a_scales, b[None], b_scales[None], np.zeros(1, np.int64), np.full(1, a.shape[0], np.int64), None)


# ---------------------------------------------------------------- fp8 grouped GEMM on AMX tiles

# bfloat16 bits of every fp8 code: exact (fp8 has 2-3 mantissa bits and a narrower exponent range), so the
# AMX bf16 tiles multiply the codes' values exactly and sum them in fp32.
_FP8_BF16 = {fmt: (F.code_values(fmt).astype(np.float32).view(np.uint32) >> 16).astype(np.int32) for fmt in FP8}


@njit(**KERNEL)
def _fp8_to_bf16_rows(codes, table, dst):
    for i in prange(codes.shape[0]):
        for j in range(codes.shape[1]):
            dst[i, j] = table[codes[i, j]]


@njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def _amx_fp8_grouped_kernel(codes, w_scales, table, half, xp, x_scales, first_tile, starts, ends, tasks, act, gated, out):
    """tasks[t] = (expert, first output column, first x row), as gemm_core's bf16 grouped kernel, with
    DeepSeek's promotion done literally: each 128-wide K block's product (AMX tiles of the fp8 values
    as bf16, fp32 sums) times x_scale[row, kb] * w_scale[e, n // 128, kb], added in fp32. The task's
    weight rows are converted to bf16 into an L2-resident buffer laid out as the microkernel takes them
    (32 rows per call: 32 output columns, or 16 gate rows then their 16 up rows)."""
    n_out, k = out.shape[1], codes.shape[2]
    steps = xp.shape[1]
    kp = 32 * steps
    per_call = 16 if gated else 32
    x_base = xp.ctypes.data
    for t in prange(tasks.shape[0]):
        e, c0, r0 = tasks[t, 0], tasks[t, 1], tasks[t, 2]
        cols, rows = min(_GROUP_ROWS // (32 // per_call), n_out - c0), min(_GROUP_X, ends[e] - r0)
        calls = -(-cols // per_call)
        w = np.zeros((32 * calls, kp), np.int16)
        w_row = np.full(32 * calls, -1, np.int64)  # the weight row of each buffer row (-1: past N, zeros)
        for p in range(32 * calls):
            c, q = p // 32, p % 32
            col = c0 + c * per_call + (q % 16 if gated else q)
            if col < c0 + cols:
                w_row[p] = col + half if gated and q >= 16 else col
                src = codes[e, w_row[p]]
                dst = w[p]
                for j in range(k):
                    dst[j] = table[src[j]]
        acc = np.zeros((_GROUP_ROWS, _GROUP_X), np.float32)
        part = np.empty((32, 32), np.float32)
        ws = np.empty(32 * calls, np.float32)
        xs = np.empty(32, np.float32)
        tile0 = first_tile[e] + (r0 - starts[e]) // 16
        _amx_begin()
        for kb in range(-(-k // BLOCK)):
            s0 = kb * (BLOCK // 32)
            for p in range(32 * calls):
                ws[p] = w_scales[e, w_row[p] // BLOCK, kb] if w_row[p] >= 0 else F32(0.0)
            for x0 in range(0, rows, 32):
                b0 = x_base + ((tile0 + x0 // 16) * steps + s0) * 1024
                xr = min(32, rows - x0)
                for r in range(xr):
                    xs[r] = x_scales[r0 + x0 + r, kb]
                for c in range(calls):
                    a0 = w.ctypes.data + (32 * c * kp + 32 * s0) * 2
                    _amx_tiles(a0, a0 + 16 * kp * 2, kp * 2, 64, b0, b0 + steps * 1024, min(BLOCK // 32, steps - s0),
                               part.ctypes.data, 32 * 4, False)
                    for p in range(32):
                        s = ws[32 * c + p]
                        dst = acc[32 * c + p, x0:x0 + xr]
                        for r in range(xr):
                            dst[r] += part[p, r] * (s * xs[r])
        _amx_end()
        for x0 in range(0, rows, 32):
            _columns_epilogue(acc, x0, out, r0 + x0, rows - x0, c0, cols, act, gated)


def _amx_fp8_grouped(out, a, a_scales, codes, b_scales, starts, ends, outside, act, gated):
    """out[starts[e]:ends[e]] = the fp8 grouped product of those rows on AMX tiles; the `outside` rows 0."""
    table = _FP8_BF16[a.dtype.name]
    x = np.empty(a.shape, np.int16)
    _fp8_to_bf16_rows(a.view(np.uint8), table, x)
    xp, first_tile = packed_q(x, False, starts, ends)
    raw = raw_view(out)
    raw[outside] = 0
    cols = _GROUP_ROWS // (2 if gated else 1)
    tasks = [(e, c0, r0) for e in range(codes.shape[0]) for r0 in range(starts[e], ends[e], _GROUP_X)
             for c0 in range(0, out.shape[1], cols)]
    _amx_fp8_grouped_kernel(codes, b_scales, table, codes.shape[1] // 2 if gated else 0, xp, a_scales, first_tile, starts, ends,
                            np.array(tasks, np.int64).reshape(-1, 3), act, gated, raw)


def _fp8_grouped(out, a, a_scales, b, b_scales, starts, ends, activation):
    """fp8_gemm_blockscale of each expert e's rows [starts[e], ends[e]) of a [R, K] into one accumulator,
    rows no expert owns 0: the contiguous and the masked layout alike (ops/moe.py). Experts with few rows
    go first, so the parallel small-M loops and the BLAS calls do not alternate. Which rows take the
    literal promotion path (non-finite scales) is decided per expert, over its own rows only."""
    act, gated = activation_code(activation)
    codes = b.view(np.uint8)
    finite_rows, finite_experts = np.isfinite(a_scales).all(axis=1), np.isfinite(b_scales).all(axis=(1, 2))
    outside = outside_segments(a.shape[0], starts, ends)
    if gemm_core.RUNG == "amx" and finite_rows[~outside].all() and finite_experts[ends > starts].all():
        _amx_fp8_grouped(out, a, a_scales, codes, b_scales, starts, ends, outside, act, gated)
        return
    table = _FP8_TABLES[a.dtype.name]
    x = _fp8_activations(a, a_scales, table)  # one parallel pass; rows outside the segments are never read
    acc = _accumulator(out, gated)
    acc[outside] = 0
    for _, e, lo, hi in sorted((hi - lo, e, lo, hi) for e, (lo, hi) in enumerate(zip(starts.tolist(), ends.tolist()))):
        if finite_experts[e] and finite_rows[lo:hi].all():
            _product(x[lo:hi], Fp8Rows(codes[e], b_scales[e], BLOCK, table), acc[lo:hi], x.shape[1])
        else:
            _fp8_promoted(acc[lo:hi], a[lo:hi], a_scales[lo:hi], codes[e], b_scales[e], table)
    _finish(acc, out, act, gated)


def fp8_grouped_gemm_blockscale(outs, a, a_scales, b, b_scales, expert_offsets, *, activation, out_dtype):
    bounds = expert_offsets.astype(np.int64)
    _fp8_grouped(outs[0], a, a_scales, b, b_scales, bounds[:-1], bounds[1:], activation)


def fp8_grouped_gemm_masked_blockscale(outs, a, a_scales, b, b_scales, masked_m, *, activation, out_dtype):
    """The masked layout as E * M rows: expert e's are [e M, e M + clamp(masked_m[e], 0, M))."""
    (e, m, k), out = a.shape, outs[0]
    starts = np.arange(e, dtype=np.int64) * m
    _fp8_grouped(out.reshape(e * m, out.shape[2]), a.reshape(e * m, k), a_scales.reshape(e * m, a_scales.shape[2]), b, b_scales,
                 starts, starts + masked_counts(masked_m, m), activation)


def int8_gemm(outs, a, b, a_scales, b_scales, bias, *, out_dtype):
    """out = (a @ b.T) * a_scales * b_scales + bias: exact int32 products, then the scaling in fp32."""
    (out,) = outs
    m, n = a.shape[0], b.shape[0]
    x = np.empty(a.shape, np.float32)  # int8 values are exact in float32
    _dequantize_parallel(Int8Rows(a), 0, x)
    acc = np.empty((m, n), np.int32)
    _product(x, Int8Rows(b), acc, INT8_EXACT_K)
    sa = np.broadcast_to(a_scales.reshape(-1), (m,))  # per token, or one per tensor
    sb = np.broadcast_to(b_scales.reshape(-1), (n,))
    _store_int8(acc, raw_view(out), sa, sb, raw_view(bias))


def w4a16_gemm(outs, a, b_packed, scales, zeros, *, group_size):
    """w = (q - zero) * scale with uint4 codes and zero points, or q * scale with signed int4 codes."""
    table = _NIBBLE_TABLES["int4" if zeros is None else "uint4"]
    if zeros is None:
        zeros = np.zeros(scales.shape, np.uint8)
    _float_gemm(outs[0], as_f32(a), NibbleRows(b_packed, table, scales.astype(np.float32), zeros, group_size))


def fp4_gemm(outs, a, b_packed, b_scales, tensor_scale, *, fmt):
    """E2M1 weights; group scale 2^(code - 127) (mxfp4, per 32) or e4m3 * tensor_scale in fp32 (nvfp4, per 16)."""
    scales = F.scale_values(fmt, b_scales, tensor_scale).astype(np.float32)  # exact products, rounded once
    group = F.MXFP4_GROUP if fmt == "mxfp4" else F.NVFP4_GROUP
    zeros = np.zeros(scales.shape, np.uint8)
    _float_gemm(outs[0], as_f32(a), NibbleRows(b_packed, _NIBBLE_TABLES["e2m1"], scales, zeros, group))


KERNELS = (
    Kernel("fp8_gemm_blockscale", fp8_gemm_blockscale, FP8),
    Kernel("fp8_grouped_gemm_blockscale", fp8_grouped_gemm_blockscale, FP8),
    Kernel("fp8_grouped_gemm_masked_blockscale", fp8_grouped_gemm_masked_blockscale, FP8),
    Kernel("int8_gemm", int8_gemm, ("int8",)),
    Kernel("w4a16_gemm", w4a16_gemm, FLOATS),
    Kernel("fp4_gemm", fp4_gemm, FLOATS),
)
