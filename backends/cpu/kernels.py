"""CPU kernels: Numba loops, parallel over rows, computing in float32 whatever the storage dtype
(float16 / bfloat16 through the integer views and load / store of common.py): softmax, rms_norm,
layer_norm, the gated elementwise ops (silu_and_mul), rope and gemm with its fused epilogue.
The memory-bound row kernels give each thread one contiguous run of rows and prefetch the next row
while computing on the current one (see _PREFETCH_BLOCK); large outputs they store non-temporally
(common.streams).
"""
import itertools
import math

import numpy as np
import numba
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from hal.codes import activation_code
from hal.ops.activations import GATED_OPS

from . import gemm_core
from .common import (BF16, F32, FASTMATH, GELU_TANH, HELPER, IR_FLAGS, KERNEL, LANES, SILU, VECTOR_ISA, Kernel, activate,
                     as_f32, as_rows, bits_f32, dot4, exp, exp_lanes, f32_bits, lanes_fit, lanes_row, load, load_lanes, masked,
                     lanes_loop, pair_order, prefetch_l2, prefetch_line, prefetch_write_l2, raw_view, rcp_lanes, sized, store, store_fence,
                     store_lanes, streams)

# ---------------------------------------------------------------- kernels

def _summed_row(x, res, s_out, r):
    """The row a norm works on: x[r] itself (its later passes then read it from L1/L2, so no scratch
    row is written), or with a residual the float32 row x[r] + res[r], also stored to s_out[r]."""


@overload(_summed_row, jit_options=HELPER)
def _summed_row_impl(x, res, s_out, r):
    if isinstance(res, types.NoneType):  # chosen by type at compile time: the two return different arrays
        return lambda x, res, s_out, r: x[r]

    def summed(x, res, s_out, r):
        buf = np.empty(x.shape[1], np.float32)
        for j in range(x.shape[1]):
            v = load(x, (r, j)) + load(res, (r, j))
            store(s_out, (r, j), v)
            buf[j] = v
        return buf

    return summed


@njit(**HELPER)
def _prefetch_rows(x, rx, y, ry, j0, j1, stream):
    """Prefetch x[rx, j0:j1] for reading and, unless y is streamed, y[ry, j0:j1] for writing, one hint per 64-byte
    line, into L2 (common.prefetch_l2)."""
    for j in range(j0, j1, 64 // x.itemsize):
        prefetch_l2(x, (rx, j))
    if not stream:
        for j in range(j0, j1, 64 // y.itemsize):
            prefetch_write_l2(y, (ry, j))


# The row kernels (norms, softmax, rope) split their rows into one contiguous run per thread and, in a
# pass over a row already in cache, prefetch the rows they read and write next, so memory stays busy
# while they compute. Such a pass goes by blocks of _PREFETCH_BLOCK elements (rope: by heads), each
# block's prefetches first (prefetches inside the vector loop keep LLVM from vectorizing it). The stubs called
# per block (_normalize_into, _exp_sum, _gated_row) are inlined: a call hands its slices over as new references,
# and Numba's reference counts are locked instructions, full barriers that wait for the streamed stores before
# them to drain. AMD EPYC Zen 3, one core, 4096 rows of 4096 bf16, called -> inlined: layer_norm 1.27-1.36 ->
# 0.45-0.50, rms_norm 1.11-1.13 -> 0.35-0.41, silu_and_mul 1.63-1.76 -> 0.71-0.74 ns an element.
_PREFETCH_BLOCK = 256


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _normalize_row(x, row, r, mean, inv, w, b, y, stream):
    """y[r] = (row - mean) * inv * w (+ b), prefetching x[r + 1] and y[r + 1] as it goes; stream: y stored
    non-temporally (common.streams)."""
    n = y.shape[1]
    nxt = min(r + 1, y.shape[0] - 1)
    for j0 in range(0, n, _PREFETCH_BLOCK):
        j1 = min(j0 + _PREFETCH_BLOCK, n)
        _prefetch_rows(x, nxt, y, nxt, j0, j1, stream)
        if b is None:  # pruned at compile time (b None is its own type)
            _normalize_into(row[j0:j1], mean, inv, w[j0:j1], None, y[r, j0:j1], stream)
        else:
            _normalize_into(row[j0:j1], mean, inv, w[j0:j1], b[j0:j1], y[r, j0:j1], stream)


@njit(**KERNEL)
def _rms_norm_kernel(x, w, res, y, s_out, eps, runs, stream):
    rows, n = x.shape
    for run in prange(runs):
        for r in range(run * rows // runs, (run + 1) * rows // runs):
            row = _summed_row(x, res, s_out, r)
            inv = F32(1.0) / np.sqrt(_power_sum(row, F32(0.0), 2) / F32(n) + eps)
            _normalize_row(x, row, r, F32(0.0), inv, w, None, y, stream)
        if stream:
            store_fence()


@njit(**KERNEL)
def _layer_norm_kernel(x, w, b, res, y, s_out, eps, runs, stream):
    rows, n = x.shape
    for run in prange(runs):
        for r in range(run * rows // runs, (run + 1) * rows // runs):
            row = _summed_row(x, res, s_out, r)
            mean = _power_sum(row, F32(0.0), 1) / F32(n)
            var = _power_sum(row, mean, 2)  # two-pass (centered) variance over the cached row: no cancellation
            inv = F32(1.0) / np.sqrt(var / F32(n) + eps)
            _normalize_row(x, row, r, mean, inv, w, b, y, stream)
        if stream:
            store_fence()




# The softmax passes, the norms' passes and the gated row as vector loops in IR over contiguous 1-D rows, 16
# float32 lanes (common.lanes_row), where Numba vectorizes the same loops in 8 (LLVM prefers 256-bit vectors on
# this CPU); the stubs pick one per dtype at compile time (common.lanes_fit). For float32 rows each computes
# what the Numba loop in its stub's overload does, bit for bit (common.exp's fused steps included), except the
# order of the sums' adds; rows stored in 16 bits take exp_lanes' shorter EXP_POLY_16 (within one 16-bit ulp
# of the loop). Per core, thread CPU time, 16 x 4096 (in L2), ns per element, float32 / bfloat16, before ->
# after the unmasked full steps, vscalefps, vcvtneps2bf16, EXP_POLY_16, 16-bit max keys and 4 accumulators:
# softmax 0.53 -> 0.35 / 0.65 -> 0.31, silu_and_mul 0.36 -> 0.28 / 0.56 -> 0.36, layer_norm 0.40 -> 0.29 /
# 0.34 -> 0.27, rms_norm 0.22 -> 0.21 / 0.28 -> 0.21. bfloat16 softmax was then compute-bound at ~28 vector
# ops per 16 lanes (max 5, exp + sum 16, scale 7; two vector ports). Then the max on raw keys (max 2),
# exp_lanes' narrow form (exp + sum 14), vfpclassps for the subnormal check of vcvtneps2bf16 (scale 5) and
# silu's vrcp14ps for 16-bit rows, same measure, before -> after: softmax bf16 0.36 -> 0.33, silu_and_mul
# bf16 0.39 -> 0.31, rope (_neox_lanes) 0.19 -> 0.15 / 0.29 -> 0.17. Per core on 4096 rows (past the caches),
# with the outputs streamed (common.streams), next rows prefetched into L2 (common.prefetch_l2) and the gated
# rows _GATED_AHEAD ahead, fp32 / bf16: softmax 0.73 -> 0.61 / 0.40 -> 0.33, silu_and_mul 0.77 -> 0.53 /
# 0.53 -> 0.38, layer_norm 0.72 -> 0.53 / 0.35 -> 0.28, rms_norm 0.64 -> 0.44 / 0.29 -> 0.20, rope 0.63 ->
# 0.46 / 0.31 -> 0.30 (a copy moves 8 bytes an element in 0.55 ns here, 0.40 streamed). On AVX2 (common.VECTOR_ISA)
# the same IR runs as two 8-lane halves, streamed and fenced alike. AMD EPYC Zen 3, AVX2, one core of 2 shared ones,
# thread CPU time, kernels called directly, ns an element 16 / 4096 rows, bf16 then fp32, Numba loops -> IR loops:
# rms_norm 1.02 / 0.75 -> 0.62 / 0.49, 0.42 / 0.73 -> 0.41 / 0.55; layer_norm 0.76 / 0.67 -> 0.74 / 0.58, 0.56 /
# 0.74 -> 0.50 / 0.61; softmax 1.36 / 1.86 -> 0.87 / 0.74, 1.10 / 1.02 -> 0.92 / 0.84; silu_and_mul 1.22 / 1.31
# -> 0.90 / 0.81, 1.12 / 1.16 -> 0.78 / 0.77; rope 0.48 / 0.57 -> 0.41 / 0.35, 0.34 / 0.60 -> 0.26 / 0.52.
# Then bf16 there, silu's divide as vrcpps (common.rcp_lanes), the exp of 16-bit results scaled by one factor, bf16's
# EXP_POLY_8 and the per-block stubs inlined (_PREFETCH_BLOCK), same measure on a busy host, before -> after:
# layer_norm 0.52 / 1.31-1.36 -> 0.42-0.45 / 0.49, softmax 0.56 / 0.57 -> 0.47-0.49 / 0.48-0.50, silu_and_mul
# 0.66-0.69 / 1.71-1.80 -> 0.50-0.51 / 0.71-0.74, rms_norm 0.40-0.42 / 1.13-1.20 -> 0.34 / 0.41; fp32 unchanged.
_ROW_JIT = dict(cache=True, fastmath=FASTMATH, error_model="numpy")  # the stubs' overloads below: a row loop's options


def _spread(builder, v):
    """The scalar v in every lane of a <LANES x v.type>."""
    vec = ir.VectorType(v.type, LANES)
    return builder.shuffle_vector(builder.insert_element(ir.Constant(vec, ir.Undefined), v, ir.IntType(32)(0)),
                                  ir.Constant(vec, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), LANES), [0] * LANES))


# Accumulators of the norms' sums (common.lanes_row's unroll): one chain of dependent 16-lane adds bounds a
# pass over a row in cache at 4 cycles a step.
_SUMS = 4


@intrinsic(prefer_literal=True)
def _power_sum_lanes(typingctx, x, shift, power):
    if not isinstance(power, types.IntegerLiteral):
        return None

    def codegen(context, builder, sig, args):
        vec = ir.VectorType(ir.FloatType(), LANES)
        zero = ir.Constant(vec, [0.0] * LANES)
        sums = [cgutils.alloca_once_value(builder, zero) for _ in range(_SUMS)]
        turn = itertools.count()  # the accumulator of each step, in turn
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]), "llvm.fma.v16f32")
        offset = _spread(builder, args[1])

        def body(j, mask, ptrs, scalars):
            x_lanes = load_lanes(builder, x.dtype, ptrs[0], mask, pair_order(mask, x.dtype))
            d = builder.select(mask, builder.fsub(x_lanes, offset, flags=IR_FLAGS), zero)
            acc = sums[next(turn) % _SUMS]
            old = builder.load(acc)
            builder.store(builder.fadd(old, d, flags=IR_FLAGS) if power.literal_value == 1 else builder.call(fma, [d, d, old]), acc)

        lanes_row(context, builder, sig, args, (0,), body, unroll=_SUMS)
        total = [builder.load(acc) for acc in sums]
        while len(total) > 1:
            total = [builder.fadd(a, b, flags=IR_FLAGS) for a, b in zip(total[::2], total[1::2])]
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.FloatType(), [ir.FloatType(), vec]),
                                            "llvm.vector.reduce.fadd.v16f32")
        return builder.call(fn, [ir.FloatType()(-0.0), total[0]])

    return types.float32(x, shift, power), codegen


@intrinsic
def _normalize_lanes(typingctx, row, mean, inv, w, b, y, stream):
    def codegen(context, builder, sig, args):
        vec = ir.VectorType(ir.FloatType(), LANES)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]), "llvm.fma.v16f32")
        shift, scale = _spread(builder, args[1]), _spread(builder, args[2])
        bias = not isinstance(b, types.NoneType)

        def body(j, mask, ptrs, scalars):
            pairs = pair_order(mask, row.dtype, w.dtype, y.dtype, *((b.dtype,) if bias else ()))
            v = builder.fsub(load_lanes(builder, row.dtype, ptrs[0], mask, pairs), shift, flags=IR_FLAGS)
            v = builder.fmul(v, scale, flags=IR_FLAGS)
            if bias:  # the bias add fused as Numba's contract does
                v = builder.call(fma, [v, load_lanes(builder, w.dtype, ptrs[1], mask, pairs), load_lanes(builder, b.dtype, ptrs[2], mask, pairs)])
            else:
                v = builder.fmul(v, load_lanes(builder, w.dtype, ptrs[1], mask, pairs), flags=IR_FLAGS)
            store_lanes(builder, y.dtype, ptrs[-1], mask, v, args[6], pairs)

        lanes_row(context, builder, sig, args, (0, 3, 4, 5) if bias else (0, 3, 5), body)
        return context.get_dummy_value()

    return types.void(row, mean, inv, w, b, y, stream), codegen


def _power_sum(x, shift, power):
    """The float32 sum of (x - shift)**power over the 1-D x, power 1 or 2 (a literal)."""


@overload(_power_sum, jit_options=_ROW_JIT, prefer_literal=True)
def _power_sum_impl(x, shift, power):
    p = power.literal_value
    if lanes_fit(x.dtype):
        return lambda x, shift, power: _power_sum_lanes(x, shift, p)

    def loop(x, shift, power):
        s = F32(0.0)
        for j in range(x.shape[0]):
            d = load(x, j) - shift
            s += d if p == 1 else d * d
        return s

    return loop


def _normalize_into(row, mean, inv, w, b, y, stream):
    """y = (row - mean) * inv * w (+ b) on 1-D slices (stream: y stored non-temporally, by the lanes loop)."""


@overload(_normalize_into, jit_options=_ROW_JIT, inline="always")
def _normalize_into_impl(row, mean, inv, w, b, y, stream):
    if lanes_fit(row.dtype, w.dtype, y.dtype, *(() if isinstance(b, types.NoneType) else (b.dtype,))):
        return lambda row, mean, inv, w, b, y, stream: _normalize_lanes(row, mean, inv, w, b, y, stream)

    def loop(row, mean, inv, w, b, y, stream):
        for j in range(y.shape[0]):
            v = (load(row, j) - mean) * inv * load(w, j)
            if b is not None:
                v += load(b, j)
            store(y, j, v)

    return loop


@intrinsic
def _exp_sum_lanes(typingctx, x, m, buf):
    def codegen(context, builder, sig, args):
        vec = ir.VectorType(ir.FloatType(), LANES)
        zero = ir.Constant(vec, [0.0] * LANES)
        total = cgutils.alloca_once_value(builder, zero)
        shift = _spread(builder, args[1])

        def body(j, mask, ptrs, scalars):
            d = builder.fsub(load_lanes(builder, x.dtype, ptrs[0], mask, pair_order(mask, x.dtype)), shift, flags=IR_FLAGS)
            e = exp_lanes(builder, d, positive=False, stored=x.dtype)  # softmax's y has x's dtype
            # buf in lane order (pair order on AVX2), as _scale_lanes reads it back: both passes step the row from
            # multiples of LANES (_PREFETCH_BLOCK is one), so their full steps cover the same elements
            store_lanes(builder, types.float32, ptrs[1], mask, e)
            builder.store(builder.fadd(builder.load(total), builder.select(mask, e, zero), flags=IR_FLAGS), total)

        lanes_row(context, builder, sig, args, (0, 2), body)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.FloatType(), [ir.FloatType(), vec]),
                                            "llvm.vector.reduce.fadd.v16f32")
        return builder.call(fn, [ir.FloatType()(-0.0), builder.load(total)])

    return types.float32(x, m, buf), codegen


@intrinsic
def _scale_lanes(typingctx, buf, inv, y, stream):
    def codegen(context, builder, sig, args):
        scale = _spread(builder, args[1])

        def body(j, mask, ptrs, scalars):
            v = builder.fmul(load_lanes(builder, types.float32, ptrs[0], mask), scale, flags=IR_FLAGS)  # in _exp_sum_lanes' order
            store_lanes(builder, y.dtype, ptrs[1], mask, v, args[3], pair_order(mask, y.dtype))

        lanes_row(context, builder, sig, args, (0, 2), body)
        return context.get_dummy_value()

    return types.void(buf, inv, y, stream), codegen


@intrinsic
def _row_max_lanes(typingctx, x):
    def codegen(context, builder, sig, args):
        # The keys are the raw bits as signed integers (bfloat16: 16-bit lanes, no widening): they order the
        # non-negative floats, and reversed the negative ones, so the float max is the key max where that is
        # >= 0, else the key min. A max and a min a step, each with its load folded (2 ops, 5 with the keys'
        # order flipped per element).
        bits = 16 if x.dtype == types.int16 else 32
        ivec = ir.VectorType(ir.IntType(bits), LANES)
        top, bottom = (ir.Constant(ivec, [v] * LANES) for v in (-2**(bits - 1), 2**(bits - 1) - 1))
        high, low = cgutils.alloca_once_value(builder, top), cgutils.alloca_once_value(builder, bottom)

        def body(j, mask, ptrs, scalars):
            raw = masked(builder, "load", ptrs[0], mask) if bits == 16 else load_lanes(builder, x.dtype, ptrs[0], mask)
            k = builder.bitcast(raw, ivec)
            for acc, pick, neutral in ((high, ">", top), (low, "<", bottom)):
                old, k_acc = builder.load(acc), builder.select(mask, k, neutral)
                builder.store(builder.select(builder.icmp_signed(pick, k_acc, old), k_acc, old), acc)

        lanes_row(context, builder, sig, args, (0,), body)
        ends = [builder.call(cgutils.get_or_insert_function(builder.module, ir.FunctionType(ivec.element, [ivec]),
                                                           f"llvm.vector.reduce.{op}.v16i{bits}"), [builder.load(acc)])
                for op, acc in (("smax", high), ("smin", low))]
        key = builder.select(builder.icmp_signed(">=", ends[0], ivec.element(0)), *ends)
        if bits == 16:
            key = builder.shl(builder.zext(key, ir.IntType(32)), ir.IntType(32)(16))
        return builder.bitcast(key, ir.FloatType())

    return types.float32(x), codegen


def _row_max(x):
    """The max of the 1-D x as float32, taken on integer keys (LLVM vectorizes an integer max, not a
    float one without nnan). A NaN with the sign bit clear is the largest key: the row is then NaN, as
    it is anyway through exp(NaN - m)."""


@overload(_row_max, jit_options=_ROW_JIT)
def _row_max_impl(x):
    if lanes_fit(x.dtype):
        return lambda x: _row_max_lanes(x)

    def loop(x):
        key = np.int32(-2**31)
        for j in range(x.shape[0]):
            bits = np.int32(f32_bits(load(x, j)))
            k = bits ^ ((bits >> 31) & np.int32(0x7FFFFFFF))  # negative floats: reverse their order
            key = k if k > key else key
        return bits_f32(key ^ ((key >> 31) & np.int32(0x7FFFFFFF)))

    return loop


def _exp_sum(x, m, buf):
    """buf = exp(x - m) in float32 (1-D); returns its sum."""


@overload(_exp_sum, jit_options=_ROW_JIT, inline="always")
def _exp_sum_impl(x, m, buf):
    if lanes_fit(x.dtype):
        return lambda x, m, buf: _exp_sum_lanes(x, m, buf)

    def loop(x, m, buf):
        s = F32(0.0)
        for j in range(buf.shape[0]):
            e = exp(load(x, j) - m)
            buf[j] = e
            s += e
        return s

    return loop


def _scale_into(buf, inv, y, stream):
    """y = buf * inv, narrowed to y's format (1-D; stream: stored non-temporally, by the lanes loop)."""


@overload(_scale_into, jit_options=_ROW_JIT)
def _scale_into_impl(buf, inv, y, stream):
    if lanes_fit(y.dtype):
        return lambda buf, inv, y, stream: _scale_lanes(buf, inv, y, stream)

    def loop(buf, inv, y, stream):
        for j in range(buf.shape[0]):
            store(y, j, buf[j] * inv)

    return loop


@njit(**KERNEL)
def _softmax_rows_kernel(x, y, runs, stream):
    """Softmax over the last, contiguous axis of x [rows, n], in `runs` contiguous runs of rows (one per thread):
    max (the one read of x from memory), exp + sum into a float32 row buffer, scale + store; one exp
    per element. The exp pass, compute on a row in cache, prefetches the next row of x and this row
    of y (unless y is streamed: common.streams), so memory traffic goes on while it runs (4096 x 4096
    fp32 / bf16: 44% / 24% of the copy bandwidth without, 62-64% / 36-38% with, on 2 shared cores)."""
    rows, n = x.shape
    for run in prange(runs):
        buf = np.empty(n, np.float32)  # float32 scratch row, stays in cache between passes
        for r in range(run * rows // runs, (run + 1) * rows // runs):
            m = _row_max(x[r])
            # A row of -inf gives (-inf) - (-inf) = NaN everywhere, like torch.
            s = F32(0.0)
            for j0 in range(0, n, _PREFETCH_BLOCK):
                j1 = min(j0 + _PREFETCH_BLOCK, n)
                _prefetch_rows(x, min(r + 1, rows - 1), y, r, j0, j1, stream)
                s += _exp_sum(x[r, j0:j1], m, buf[j0:j1])
            _scale_into(buf, F32(1.0) / s, y[r], stream)
        if stream:
            store_fence()


# Column-wise steps of the strided softmax on contiguous 1-D slices (which LLVM vectorizes,
# unlike the same loops written with 3-D indices).
@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _max_into(x, m):
    for i in range(m.shape[0]):
        v = load(x, i)
        m[i] = v if v > m[i] else m[i]


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _sum_exp_into(x, m, s):
    for i in range(m.shape[0]):
        s[i] += exp(load(x, i) - m[i])


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _write_exp(x, m, inv, y):
    for i in range(m.shape[0]):
        store(y, i, exp(load(x, i) - m[i]) * inv[i])


@njit(**KERNEL)
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
            s[i] = F32(1.0) / s[i]
        for j in range(n):
            _write_exp(x[o, j, i0:i0 + w], m, s, y[o, j, i0:i0 + w])


@intrinsic(prefer_literal=True)
def _gated_lanes(typingctx, g, u, y, act, stream):
    """y = act(g) * u for act SILU or GELU_TANH (a literal), common.silu / gelu_tanh in IR; stream: y stored non-temporally."""
    if not isinstance(act, types.IntegerLiteral):
        return None

    def codegen(context, builder, sig, args):
        vec = ir.VectorType(ir.FloatType(), LANES)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]), "llvm.fma.v16f32")
        narrow = y.dtype != types.float32
        rcp = narrow and (VECTOR_ISA == "avx512" or y.dtype == types.int16)  # common.rcp_lanes' error against y's bits

        def c(value):
            return ir.Constant(vec, [value] * LANES)

        def body(j, mask, ptrs, scalars):
            pairs = pair_order(mask, g.dtype, u.dtype, y.dtype)
            x = load_lanes(builder, g.dtype, ptrs[0], mask, pairs)
            if act.literal_value == SILU:
                z = builder.fneg(x)
            else:  # -2 * 0.7978845608028654 * (x + 0.044715 * x * x * x), the cube's add fused as Numba's contract does
                cube = builder.fmul(builder.fmul(c(0.044715), x, flags=IR_FLAGS), x, flags=IR_FLAGS)
                w = builder.fmul(c(0.7978845608028654), builder.call(fma, [cube, x, x]), flags=IR_FLAGS)
                z = builder.fmul(c(-2.0), w, flags=IR_FLAGS)
            d = exp_lanes(builder, z, plus=1.0, stored=y.dtype)
            if rcp:  # x * 1 / d: a 512-bit vdivps takes ~10 cycles of a vector port (AVX2: two 8-lane divides; float16 keeps them)
                v = builder.fmul(x, rcp_lanes(builder, d), flags=IR_FLAGS)
            else:
                v = builder.fdiv(x, d, flags=IR_FLAGS)
            v = builder.fmul(v, load_lanes(builder, u.dtype, ptrs[1], mask, pairs), flags=IR_FLAGS)
            store_lanes(builder, y.dtype, ptrs[2], mask, v, args[4], pairs)

        lanes_row(context, builder, sig, args, (0, 1, 2), body)
        return context.get_dummy_value()

    return types.void(g, u, y, act, stream), codegen


def _gated_row(g, u, y, act, stream):
    """y = act(g) * u on 1-D rows (act a constant activation code; stream: y stored non-temporally, by the lanes loop)."""


@overload(_gated_row, jit_options=_ROW_JIT, prefer_literal=True, inline="always")
def _gated_row_impl(g, u, y, act, stream):
    code = act.literal_value
    if code in (SILU, GELU_TANH) and lanes_fit(g.dtype, y.dtype):
        return lambda g, u, y, act, stream: _gated_lanes(g, u, y, code, stream)

    def loop(g, u, y, act, stream):
        for j in range(y.shape[0]):
            store(y, j, activate(load(g, j), code) * load(u, j))

    return loop


# How far ahead of its step the gated kernel prefetches its rows, in elements, where they come from memory
# (stream). One core, 4096 x (2 x 5632), ns an element fp32 / bf16: no prefetch 0.66 / 0.48, the next row
# (as the norms do) 0.77 / 0.42 (fp32: 44 KiB ahead, L1 is 48), 256 ahead 0.61 / 0.39, 512 0.57 / 0.37,
# 768 0.60 / 0.36, 2048 0.70 / 0.38. In L2 (16 rows) the blocks and prefetches cost 10%: only for stream.
_GATED_AHEAD = 512


def _gated_kernel(act):
    """The kernel y[r, j] = act(x[r, j]) * x[r, d + j] of the gated elementwise ops (silu_and_mul, ...),
    compiled per activation: the code is a constant of the loop, so it vectorizes (a code passed as
    an argument leaves the branches of activate() in the loop: 8x slower for bfloat16). stream: rows
    past the caches (common.streams of y): y stored non-temporally, x prefetched ahead."""

    @njit(**KERNEL)
    def gated_kernel(x, y, runs, stream):
        rows, d = y.shape
        for run in prange(runs):  # one run of rows per thread: one store fence each (a fence a row cost 10%)
            for r in range(run * rows // runs, (run + 1) * rows // runs):
                if not stream:
                    _gated_row(x[r, :d], x[r, d:], y[r], act, False)
                    continue
                for j0 in range(0, d, _PREFETCH_BLOCK):  # x _GATED_AHEAD elements ahead, into the next row
                    j1 = min(j0 + _PREFETCH_BLOCK, d)
                    ahead = j0 + _GATED_AHEAD
                    rx = r if ahead < d else min(r + 1, rows - 1)
                    a0 = min(ahead if ahead < d else ahead - d, d - 1)
                    a1 = min(a0 + _PREFETCH_BLOCK, d)
                    _prefetch_rows(x, rx, x, rx, a0, a1, True)  # (x as the "output" too: not prefetched for writing)
                    _prefetch_rows(x, rx, x, rx, d + a0, d + a1, True)
                    _gated_row(x[r, j0:j1], x[r, d + j0:d + j1], y[r, j0:j1], act, True)
            if stream:
                store_fence()

    return gated_kernel


@njit(**HELPER)
def _rotate(x, out, t, h, i1, i2, c, s):
    x1 = load(x, (t, h, i1))
    x2 = load(x, (t, h, i2))
    store(out, (t, h, i1), x1 * c - x2 * s)
    store(out, (t, h, i2), x2 * c + x1 * s)


@intrinsic
def _neox_lanes(typingctx, x, out, t, c, s, prefetching, stream):
    """Rotate every head of token t of x [T, H, D] into out in the NeoX layout, the pairs (i, i + half) with half
    the length of the float32 rows c, s: y1 = x1 * c - x2 * s, y2 = x2 * c + x1 * s, the subtraction and the add
    fused. If prefetching, each head's lines of token t + 1 first (in out too unless stream: stored non-temporally).
    Returns True: it did the work (`_neox_heads`). One core, 16 tokens of 40 heads of 128 (in L2), ns an element
    bf16 / fp32: the Numba loop 0.30 / 0.21, a 16-lane loop per head called from it 0.28 / 0.18, this 0.18 / 0.15."""
    def codegen(context, builder, sig, args):
        xs, outs, cs, ss = (context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 1, 3, 4))
        tokens, heads, dim = cgutils.unpack_tuple(builder, xs.shape)
        half = cgutils.unpack_tuple(builder, cs.shape)[0]
        i64 = ir.IntType(64)
        t = args[2]
        nxt = builder.select(builder.icmp_signed("<", builder.add(t, i64(1)), tokens), builder.add(t, i64(1)), t)
        vec = ir.VectorType(ir.FloatType(), LANES)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]), "llvm.fma.v16f32")

        def body(j, mask, ptrs):
            a, b, cos, sin = (load_lanes(builder, d, p, mask) for d, p in zip((x.dtype, x.dtype, c.dtype, s.dtype), ptrs))
            y1 = builder.call(fma, [a, cos, builder.fneg(builder.fmul(b, sin, flags=IR_FLAGS))])
            y2 = builder.call(fma, [b, cos, builder.fmul(a, sin, flags=IR_FLAGS)])
            for at, v in ((ptrs[4], y1), (ptrs[5], y2)):
                store_lanes(builder, out.dtype, at, mask, v, args[6])

        with cgutils.for_range(builder, heads) as loop:
            row, ahead = (builder.mul(builder.add(builder.mul(r, heads), loop.index), dim) for r in (t, nxt))
            with builder.if_then(args[5]):
                with cgutils.for_range_slice(builder, i64(0), dim, i64(512 // x.dtype.bitwidth)) as (j, _):  # one a 64-byte line
                    at = builder.add(ahead, j)
                    prefetch_line(builder, builder.gep(xs.data, [at]), False, 2)
                    with builder.if_then(builder.not_(args[6])):
                        prefetch_line(builder, builder.gep(outs.data, [at]), True, 2)
            second = builder.add(row, half)
            lanes_loop(builder, half, [builder.gep(xs.data, [row]), builder.gep(xs.data, [second]), cs.data, ss.data,
                                       builder.gep(outs.data, [row]), builder.gep(outs.data, [second])], body)
        return ir.IntType(1)(1)

    return types.boolean(x, out, t, c, s, prefetching, stream), codegen


def _neox_heads(x, out, t, c, s, prefetching, stream):
    """_neox_lanes where it runs (AVX-512, contiguous x and out), returning True; else False, doing nothing."""


@overload(_neox_heads, jit_options=_ROW_JIT)
def _neox_heads_impl(x, out, t, c, s, prefetching, stream):
    if x.layout == out.layout == "C" and lanes_fit(x.dtype, out.dtype):
        return lambda x, out, t, c, s, prefetching, stream: _neox_lanes(x, out, t, c, s, prefetching, stream)
    return lambda x, out, t, c, s, prefetching, stream: False


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _rope_token(x, out, t, c, s, interleaved, rotary_dim, prefetching, stream):
    """Rotate every head of token t of x [T, H, D] with the float32 cos/sin row c, s; if prefetching,
    prefetch the same head of token t + 1 in x and out before each head (stream: out stored non-temporally
    where the IR loop does it, so not prefetched)."""
    half = rotary_dim // 2
    nxt = min(t + 1, x.shape[0] - 1)
    if interleaved or not _neox_heads(x, out, t, c, s, prefetching, stream):
        for h in range(x.shape[1]):
            if prefetching:
                for j in range(0, x.shape[2], 64 // x.itemsize):
                    prefetch_l2(x, (nxt, h, j))
                    prefetch_write_l2(out, (nxt, h, j))
            # GPT-J pairs neighbours (2i, 2i+1), NeoX the two halves (i, i + half). One loop per
            # layout: constant strides let LLVM vectorize each (a per-element choice did not).
            if interleaved:
                for i in range(half):
                    _rotate(x, out, t, h, 2 * i, 2 * i + 1, c[i], s[i])
            else:
                for i in range(half):
                    _rotate(x, out, t, h, i, i + half, c[i], s[i])
    for h in range(x.shape[1]):
        for j in range(rotary_dim, x.shape[2]):
            store(out, (t, h, j), load(x, (t, h, j)))


@njit(**KERNEL)
def _rope_kernel(q, k, cos, sin, positions, q_out, k_out, interleaved, rotary_dim, runs, prefetching, stream):
    half = rotary_dim // 2
    tokens = q.shape[0]
    for run in prange(runs):
        c = np.empty(half, np.float32)  # the cos/sin row widened once per token, shared by all heads
        s = np.empty(half, np.float32)
        for t in range(run * tokens // runs, (run + 1) * tokens // runs):
            p = positions[t]
            for i in range(half):
                c[i] = load(cos, (p, i))
                s[i] = load(sin, (p, i))
            _rope_token(q, q_out, t, c, s, interleaved, rotary_dim, prefetching, stream)
            _rope_token(k, k_out, t, c, s, interleaved, rotary_dim, prefetching, stream)
        if stream:
            store_fence()


@njit(**HELPER)
def _epilogue(v, out, bias, c, alpha, beta, act, r, j):
    """out[r, j] = act(alpha * v + bias[j]) + beta * c[r, j], v the float32 accumulator."""
    v *= alpha
    if bias is not None:
        v += load(bias, j)
    v = activate(v, act)
    if c is not None:
        v += beta * load(c, (r, j))
    store(out, (r, j), v)


@njit(**KERNEL)
def _gemm_epilogue_kernel(acc, out, bias, c, alpha, beta, act):
    """out = act(alpha * acc + bias) + beta * c, row by row (vector loops); acc may be out itself (float32)."""
    for r in prange(acc.shape[0]):
        gemm_core.epilogue_rows(acc, r, 1, out.shape[1], out, r, 0, bias, c, alpha, beta, act)


# Inner loops of the small-M gemm on contiguous 1-D slices, so LLVM vectorizes them.
@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _widen_into(src, dst):
    for i in range(dst.shape[0]):
        dst[i] = load(src, i)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _axpy4(s, r, y):
    """y += s[0] * r[0] + ... + s[3] * r[3]: four rows of b per pass over the accumulator row,
    which keeps the loop from being bound by its loads and stores of y."""
    s0, s1, s2, s3 = s[0], s[1], s[2], s[3]
    r0, r1, r2, r3 = r[0], r[1], r[2], r[3]
    for j in range(y.shape[0]):
        y[j] += s0 * r0[j] + s1 * r1[j] + s2 * r2[j] + s3 * r3[j]


@njit(**KERNEL)
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
                    d = dot4(a[i], buf)
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

def _flat(b):
    """b [K, N] as (flat raw 1-D view, leading dimension, transposed) when its rows or its columns
    are contiguous with non-negative strides (row-major, column-major, or a slice of either), else None."""
    raw = raw_view(b)
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
# never takes it: OpenBLAS's gemv/gemm was as fast or faster (M = 1: 0.24 vs 0.6 ms; see _SMALL_M_FMA32).
# bfloat16 past M = 16 goes to hal's AMX driver where there is one: on a quiet machine, 4096 x 4096, M = 16
# took 3.9 ms here against 4.4 ms there, M = 32 4.15 against 4.26 ms (torch: 1.7-2.0 ms; M = 1: 1.2 ms
# here, 1.9 ms for torch).
_SMALL_M = {np.dtype(np.float32): 0, np.dtype(np.float16): 16, BF16: 16}
# bfloat16 a with row-major b takes gemm_core.strip_gemm (vdpbf16ps) instead, up to _SMALL_M_DOT rows on
# the amx rung (past it AMX, now that it packs B by vectors) and for every M on avx512bf16 (so does b = W.T past
# _SMALL_M[BF16] rows: measured in docs/hardware.md). Per
# core (CPU ms, one thread each, shared host; vdpbf16ps / AMX / torch): 4096 x 4096, M = 1: 1.9 / 3.6-5.3 /
# 4.1-4.6, M = 8: 3.9-4.0 / 3.6-4.0 / 3.4-3.6, M = 12: 5.1-5.4 / 3.4-3.8 / 3.1-3.3, M = 32: 14-15 / 3.8-5.8 /
# 3.3-4.0; 4096 x 14336, M = 8: 18-20 / 23-36 / 17-18, M = 16: 33-34 / 18-39 / 16-17; 14336 x 4096, M = 8:
# 16-20 / 20-22 / 16-19. vdpbf16ps runs at ~0.6 ns a core here (32 products), so past M ~ 8 it is
# compute-bound where a 16-row AMX tile is not.
_SMALL_M_DOT = 8
# bfloat16 a with b = W.T (W [N, K] contiguous, K and N multiples of 32) from 2 to _SMALL_M_W rows takes
# gemm_core.amx_grouped on the amx rung, W's rows in place as AMX's A operand (no packing of W), then the
# epilogue pass. Per core (CPU ms, shared host; 4096 x 4096, M = 1 / 2 / 8 / 16 / 32): 3.3-4.4 / 2.9 / 4.1 /
# 4.2 / 4.4, against 2.6-3.5 / 3.9 / 9.0 / 14.9 / 24.7 on the float32 FMA kernel, 16-21 on amx_gemm (B^T
# packed by scalar loops) and 2.3-3.1 / 2.5 / 3.7 / 3.5 / 4.6 for torch; 8 x 4096 x 14336: 19 against 31 /
# 67, torch 12. M = 1 (any K and N, on amx and avx512bf16) takes gemm_core.dot_gemm, x against W's rows on
# vdpbf16ps: per core 1.2 / 6.3 ms at 4096 x 4096 / 4096 x 14336 against 2.1 / 9.6 on the FMA kernel, torch 2.0 / 8.2.
_SMALL_M_W = 32
# float32 a and b (row-major, or b = W.T) past _SMALL_M_FMA32 rows take gemm_core.strip_gemm on FMAs on the
# avx512bf16 rung (Zen 4), the epilogue fused: per core (CPU ms, one thread each, shared host; FMA driver /
# OpenBLAS + epilogue pass / torch, silu), 1024^3: 20.7-21.2 / 23.4-24.3 / 22.4-24.2; 2048^3 (gelu_tanh):
# 161.6-170 / 170.4-171.6 / 191-210; 128 x 4096 x 4096: 49.9 / 51.1 / 50.1; 4096 x 4096, M = 2 / 8 / 32: 6.6 / 8.9 / 17.4
# against 10.9 / 12.9 / 20.7 (b = W.T: 10.6 / 11.6 / 19.0 against 15.6 / 16.9 / 25.3), but M = 1: 6.3 (W.T 10.6)
# against 4.4-4.5 for OpenBLAS's gemv. The amx rung (Intel) keeps BLAS: not measured there.
_SMALL_M_FMA32 = 1
# Columns of N per task (measured): row-major b reads 2-4 KB runs of each row (shorter ones ran
# slower), the [M, block] accumulator stays in L2; transposed b needs only a few columns per task.
_SMALL_M_BLOCK = 1024
_SMALL_M_BLOCK_T = 64


def gemm(outs, a, b, bias, c, *, activation, alpha, beta, out_dtype=None):
    """out = act(alpha * (a @ b) + bias) + beta * c (out_dtype is outs[0].dtype): for a few rows of a a Numba
    kernel that reads b once in its own format (bfloat16 a and row-major b: vdpbf16ps; b = W.T: one row on
    vdpbf16ps, more on AMX, W's rows in place); bfloat16 on hal's own drivers (gemm_core.py: AMX, or vdpbf16ps at
    any M on avx512bf16); float32 a and b from 2 rows on avx512bf16 on the same register-tiled driver with FMAs
    (row-major b or b = W.T, epilogue fused); else float32 BLAS and one vectorized epilogue pass."""
    (out,) = outs
    act, _ = activation_code(activation)
    m, (k, n) = a.shape[0], b.shape
    # every path's epilogue reads bias and c contiguous: strided ones would compile each epilogue again
    bias, c = (None if t is None else np.ascontiguousarray(t) for t in (bias, c))
    amx = b.dtype == BF16 and gemm_core.RUNG == "amx"
    dpbf16 = a.dtype == BF16 and gemm_core.RUNG == "avx512bf16"  # every M on vdpbf16ps (gemm_core.strip_gemm)
    fma32 = a.dtype == b.dtype == np.float32 and gemm_core.RUNG == "avx512bf16" and m > _SMALL_M_FMA32  # on FMAs (strip_gemm)
    flat = _flat(b) if 0 < m and (m <= _SMALL_M.get(b.dtype, 0) or dpbf16 or fma32) else None
    row_major = flat is not None and not flat[2]
    # row-major b in place: bfloat16 on vdpbf16ps up to _SMALL_M_DOT rows where AMX takes the rest; float32 on FMAs
    dot = row_major and a.dtype == BF16 and gemm_core.RUNG != "fma" and "avx512bf16" in gemm_core.RUNGS
    if dot and (m <= _SMALL_M_DOT or not amx) or row_major and fma32:
        gemm_core.strip_gemm(raw_view(a), flat[0], flat[1], raw_view(out), raw_view(bias), raw_view(c), alpha, beta, act)
        return
    w = raw_view(b).T  # b = W.T, W [N, K] (nn.Linear weights): AMX reads W's rows in place
    if m == 1 and a.dtype == BF16 and w.strides[1] == 2 and gemm_core.RUNG != "fma" and "avx512bf16" in gemm_core.RUNGS:
        gemm_core.dot_gemm(raw_view(a), w, raw_view(out), raw_view(bias), raw_view(c), alpha, beta, act)
        return
    if amx and a.dtype == BF16 and 1 < m <= _SMALL_M_W and w.strides[1] == 2 and k % 32 == 0 and n % 32 == 0:
        acc = np.empty((m, n), np.float32)
        gemm_core.amx_grouped(raw_view(a), w[None], np.zeros(1, np.int64), np.full(1, m, np.int64), 0, False, acc)
        _gemm_epilogue_kernel(acc, raw_view(out), raw_view(bias), raw_view(c), F32(alpha), F32(beta), act)
        return
    if (dpbf16 and m > _SMALL_M[BF16] or fma32) and w.strides[1] == w.itemsize:  # W's rows packed per strip
        gemm_core.strip_gemm(raw_view(a), w, None, raw_view(out), raw_view(bias), raw_view(c), alpha, beta, act)
        return
    if flat is not None and not dot and m <= _SMALL_M[b.dtype]:
        a32 = np.ascontiguousarray(as_f32(a))
        block = _SMALL_M_BLOCK_T if flat[2] else _SMALL_M_BLOCK
        _gemm_small_m_kernel(a32, flat[0], flat[1], flat[2], raw_view(out), raw_view(bias), raw_view(c), F32(alpha), F32(beta),
                             act, block)
        return
    if b.dtype == BF16 and gemm_core.RUNG == "amx":
        gemm_core.amx_gemm(raw_view(a), raw_view(b), raw_view(out), raw_view(bias), raw_view(c), alpha, beta, act)
        return
    # One BLAS call, then one epilogue pass: BLAS by row panels with the epilogue on each panel while in
    # L2 measured 1.6-8x slower at 1024^3 and 2048^3 (every panel hands the cores from OpenBLAS's spinning
    # threads to Numba's and back).
    a32, b32 = as_f32(a), as_f32(b)
    if out.dtype == np.float32:
        np.matmul(a32, b32, out=out)
        if act == 0 and alpha == 1 and bias is None and c is None:
            return
        acc = out  # epilogue in place
    else:
        acc = np.matmul(a32, b32)
    _gemm_epilogue_kernel(acc, raw_view(out), raw_view(bias), raw_view(c), F32(alpha), F32(beta), act)


def _runs(rows):
    """How many contiguous runs a row kernel splits its rows into: one per thread (the thread count
    Numba started; numba.get_num_threads() costs 1.6 us from Python, a third of a one-row call)."""
    return min(rows, numba.config.NUMBA_NUM_THREADS)


_SOFTMAX_L2_BYTES = 1 << 18  # float32 bytes of one strided-softmax block (x rows * columns)


def softmax(outs, x, *, dim):
    """Softmax of x along dim (a non-negative int)."""
    (y,) = outs
    outer, n, inner = math.prod(x.shape[:dim]), x.shape[dim], math.prod(x.shape[dim + 1:])
    nbytes = x.nbytes + y.nbytes
    if inner == 1:
        rows = raw_view(y).reshape(outer, n)
        sized(_softmax_rows_kernel, nbytes)(raw_view(x).reshape(outer, n), rows, _runs(outer), streams(rows))
    else:
        block = min(inner, max(16, _SOFTMAX_L2_BYTES // (4 * max(n, 1)) // 16 * 16))
        sized(_softmax_strided_kernel, nbytes)(raw_view(x).reshape(outer, n, inner), raw_view(y).reshape(outer, n, inner), block)


def rms_norm(outs, x, weight, residual, *, eps):
    """y = s / sqrt(mean(s^2) + eps) * weight with s = x (+ residual); outs = (y,) or (y, s)."""
    n = x.shape[-1]
    s_out = outs[1] if residual is not None else None
    y = as_rows(outs[0], n)
    sized(_rms_norm_kernel, 2 * x.nbytes)(as_rows(x, n), raw_view(weight), as_rows(residual, n), y, as_rows(s_out, n), F32(eps),
                                          _runs(math.prod(x.shape[:-1])), streams(y))


def layer_norm(outs, x, weight, bias, residual, *, eps):
    """y = (s - mean) / sqrt(var + eps) * weight + bias with s = x (+ residual); outs = (y,) or (y, s)."""
    n = x.shape[-1]
    s_out = outs[1] if residual is not None else None
    y = as_rows(outs[0], n)
    sized(_layer_norm_kernel, 2 * x.nbytes)(as_rows(x, n), raw_view(weight), raw_view(bias), as_rows(residual, n), y,
                                            as_rows(s_out, n), F32(eps), _runs(math.prod(x.shape[:-1])), streams(y))


def gated(name):
    """The kernel of the gated elementwise op `name`: out[..., :d] = act(x[..., :d]) * x[..., d:]."""
    compiled = _gated_kernel(activation_code(name)[0])

    def kernel(outs, x):
        (y,) = outs
        d = y.shape[-1]
        rows = as_rows(y, d)
        sized(compiled, x.nbytes + y.nbytes)(as_rows(x, 2 * d), rows, _runs(rows.shape[0]), streams(rows))

    kernel.__name__ = kernel.__qualname__ = name
    return kernel


# Below this many bytes of q and k they stay in L2 and rope's prefetches (a load slot each, against little
# compute per element) only cost: 32 tokens x 40 heads x 128 fp32 (0.6 MiB) ran 1.5x slower with them.
_ROPE_PREFETCH_BYTES = 1 << 22


def rope(outs, q, k, cos, sin, positions, *, interleaved, rotary_dim):
    """Rotary embedding of q [T, Hq, D] and k [T, Hk, D] at the given positions."""
    q_out, k_out = outs
    nbytes = q.nbytes + k.nbytes
    # Streamed where every 16-lane step of the NeoX loop starts on a vector of its own (both halves of each head), for
    # float32 only: 16-bit steps store 32 bytes to the lines of the two halves in turn, and streamed, bfloat16 took
    # 0.40 ns an element against 0.31 (one core, 4096 tokens; float32 0.50 against 0.58).
    stream = (not interleaved and rotary_dim % 32 == 0 and q.shape[-1] % 16 == 0 and q_out.dtype == np.float32
              and streams(q_out) and streams(k_out))
    sized(_rope_kernel, 2 * nbytes)(raw_view(q), raw_view(k), raw_view(cos), raw_view(sin), positions, raw_view(q_out),
                                    raw_view(k_out), bool(interleaved), int(rotary_dim), _runs(q.shape[0]),
                                    nbytes > _ROPE_PREFETCH_BYTES, stream)


KERNELS = (
    Kernel("softmax", softmax),
    Kernel("rms_norm", rms_norm),
    Kernel("layer_norm", layer_norm),
    *(Kernel(op.name, gated(op.name)) for op in GATED_OPS),
    Kernel("rope", rope),
    # BLAS takes any strides, so gemm's operands are not copied to contiguous first.
    Kernel("gemm", gemm, options={"contiguous": False}),
)
