"""hal's own GEMM drivers on the CPU: AMX tiles, cache blocking, packing, fused epilogue (bfloat16), and a
register-tiled driver for bfloat16 (vdpbf16ps) and float32 (FMA) on AVX-512.

Both GEMMs of the CPU backend that run bfloat16 with many rows use it: gemm (kernels.py) computes
T = A B, grouped_gemm (moe.py) T = W X^T per expert, so the big weight W is read in place and only
the activations are packed. The core product is T[i, j] = sum_k P[i, k] Q[j, k] with

- P, the AMX "A" operand: 16-row x 32-element (64-byte) tiles read with a row stride: A packed
  into 1 KB tiles (lda 64 bytes), or the rows of W in place (lda its row stride);
- Q, the "B" operand, packed VNNI: for 16 columns j and 32 k one 1 KB tile whose row r holds
  (Q[j, 2r], Q[j, 2r + 1]) for j = 0..15, every K chunk of a column tile 1 KB after the last.

The microkernel (`_amx_tiles`) keeps a 32 x 32 float32 block of T in tmm0-3 and streams pairs of P
and Q tiles through tmm4-7 (four tdpbf16ps per 32-k step: 32 K multiply-adds per 4 KB loaded),
then stores the block to a float32 buffer where the epilogue reads it while it is in L1.
Zero padding makes tails safe: Q's K tail is zero in the packed tile and P's K tail is either
packed with zeros or, in place, K % 32 == 0 is required (a stale inf times 0 would be NaN). Rows
of P past its end only feed rows of T that are never stored.

Rungs, picked once per process (`RUNG`, shown by `hal backends --json` as "gemm"): "amx" (AMX-BF16
and the OS's permission for the tile state, asked for with arch_prctl), else "avx512bf16" or "fma":
grouped GEMMs then take moe.py's register-tiled dot-product kernel (vdpbf16ps, or FMAs on operands
widened in registers). On avx512bf16 a bfloat16 gemm takes the vdpbf16ps driver here (`strip_gemm`:
a 6 x 64 register tile, row-major b unpacked into pairs as it is read, b = W.T packed by a transpose),
for row-major b at any M and for b = W.T past kernels._SMALL_M rows; on amx row-major b takes it up to
kernels._SMALL_M_DOT rows. One row with b = W.T takes the dot kernel (vdpbf16ps on W's rows in place)
on both; on "fma" gemm widens to float32 (BLAS, or kernels.py's FMA kernel for a few rows). float32 a
and b (row-major, or b = W.T) from 2 rows take the same driver on avx512bf16 with FMAs (vfmadd231ps)
in the same 6 x 64 tile (kernels._SMALL_M_FMA32); other rungs keep OpenBLAS and an epilogue pass.
HAL_CPU_GEMM=amx|avx512bf16|fma, read at import, forces a lower rung (for
tests); float16 never takes AMX or vdpbf16ps, since rounding it to bfloat16 would lose three bits.
"""
import ctypes
import os
import sys
import threading
import warnings

import llvmlite.binding as llvm
import numba
import numpy as np
from llvmlite import ir
from numba import njit, parallel_chunksize, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from . import aligned
from .common import CPU_FEATURES, FASTMATH, KERNEL, U32, Chunks, activate_row, lane_sums, lanes_below, load, prefetch_line, store

# ---------------------------------------------------------------- which microkernel

_ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA, _SYS_ARCH_PRCTL = 0x1023, 18, 158  # arch_prctl: x86-64 Linux


def _amx_permitted():
    """Linux hands out the 8 KB tile state only to processes that ask (once, for all threads)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.syscall(_SYS_ARCH_PRCTL, _ARCH_REQ_XCOMP_PERM, _XFEATURE_XTILEDATA) == 0
    except (OSError, AttributeError):
        return False


def _rungs():
    """The bfloat16 rungs this process can run, fastest first."""
    rungs = []
    if {"amx-tile", "amx-bf16"} <= CPU_FEATURES and sys.platform.startswith("linux") and _amx_permitted():
        rungs.append("amx")
    if "avx512bf16" in CPU_FEATURES:
        rungs.append("avx512bf16")
    return (*rungs, "fma")


RUNGS = _rungs()


def _chosen():
    forced = os.environ.get("HAL_CPU_GEMM", "").strip().lower()
    if not forced:
        return RUNGS[0]
    if forced not in RUNGS:  # a rung the CPU lacks would abort in LLVM or fault: take the best one there is
        warnings.warn(f"HAL_CPU_GEMM={forced!r} is not one of this CPU's rungs {RUNGS}: using {RUNGS[0]}", RuntimeWarning)
        return RUNGS[0]
    return forced


RUNG = _chosen()
if "amx" in RUNGS:
    llvm.initialize_native_asmparser()  # the AMX instructions are inline assembly

# ---------------------------------------------------------------- AMX microkernel

_I8, _I16, _I64 = ir.IntType(8), ir.IntType(16), ir.IntType(64)


def _asm(builder, text, constraints, args=()):
    builder.asm(ir.FunctionType(ir.VoidType(), [a.type for a in args]), text, constraints + ",~{memory}" if args else "~{memory}",
                list(args), side_effect=True)


@intrinsic
def _amx_begin(typingctx):
    """Load the tile configuration: palette 1, tmm0-7 all 16 rows x 64 bytes."""
    def codegen(context, builder, sig, args):
        cfg = builder.alloca(ir.ArrayType(_I8, 64))
        builder.store(ir.Constant(ir.ArrayType(_I8, 64), bytearray(64)), cfg)
        base = builder.ptrtoint(cfg, _I64)
        put = lambda offset, value, ty: builder.store(ir.Constant(ty, value), builder.inttoptr(
            builder.add(base, ir.Constant(_I64, offset)), ty.as_pointer()))
        put(0, 1, _I8)  # palette
        for t in range(8):
            put(16 + 2 * t, 64, _I16)  # bytes per row
            put(48 + t, 16, _I8)  # rows
        _asm(builder, "ldtilecfg ($0)", "r", [base])
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def _amx_end(typingctx):
    """Release the tiles (tilerelease): the kernel then need not save their 8 KB at a context switch."""
    def codegen(context, builder, sig, args):
        _asm(builder, "tilerelease", "")
        return context.get_dummy_value()

    return types.void(), codegen


@intrinsic
def _amx_tiles(typingctx, a0, a1, lda, a_step, b0, b1, steps, c, ldc, accumulate):
    """The float32 32 x 32 block at address c (row stride ldc bytes) = (or += if accumulate) P Q^T over
    `steps` chunks of 32 k: P rows 0-15 from the tiles at a0, rows 16-31 at a1 (row stride lda, the
    next chunk a_step bytes on), Q columns 0-15 from the packed tiles at b0, 16-31 at b1 (1 KB apart).
    Addresses are integers; tmm0-3 hold the block, tmm4-5 P, tmm6-7 Q."""
    sig = types.void(*([types.intp] * 9), types.boolean)

    def codegen(context, builder, sig, args):
        a0, a1, lda, a_step, b0, b1, steps, c, ldc, accumulate = args
        row16 = builder.mul(ldc, ir.Constant(_I64, 16))
        half = ir.Constant(_I64, 64)
        blocks = ((0, c), (1, builder.add(c, half)), (2, builder.add(c, row16)), (3, builder.add(builder.add(c, row16), half)))
        with builder.if_else(builder.trunc(accumulate, ir.IntType(1))) as (then, otherwise):
            with then:
                for t, address in blocks:
                    _asm(builder, f"tileloadd ($0,$1,1), %tmm{t}", "r,r", [address, ldc])
            with otherwise:
                for t in range(4):
                    _asm(builder, f"tilezero %tmm{t}", "")
        tile = ir.Constant(_I64, 1024)
        with cgutils.for_range(builder, steps) as loop:
            i = loop.index
            a_off = builder.mul(i, a_step)
            b_off = builder.mul(i, tile)
            _asm(builder, "tileloadd ($0,$1,1), %tmm4", "r,r", [builder.add(a0, a_off), lda])
            _asm(builder, "tileloadd ($0,$1,1), %tmm6", "r,r", [builder.add(b0, b_off), half])
            _asm(builder, "tdpbf16ps %tmm6, %tmm4, %tmm0", "")
            _asm(builder, "tileloadd ($0,$1,1), %tmm7", "r,r", [builder.add(b1, b_off), half])
            _asm(builder, "tdpbf16ps %tmm7, %tmm4, %tmm1", "")
            _asm(builder, "tileloadd ($0,$1,1), %tmm5", "r,r", [builder.add(a1, a_off), lda])
            _asm(builder, "tdpbf16ps %tmm6, %tmm5, %tmm2", "")
            _asm(builder, "tdpbf16ps %tmm7, %tmm5, %tmm3", "")
        for t, address in blocks:
            _asm(builder, f"tilestored %tmm{t}, ($0,$1,1)", "r,r", [address, ldc])
        return context.get_dummy_value()

    return sig, codegen


# ---------------------------------------------------------------- vector code: b's rows as bfloat16 pairs

_V16F, _V16I, _V32S = ir.VectorType(ir.FloatType(), 16), ir.VectorType(ir.IntType(32), 16), ir.VectorType(_I16, 32)


def _pairs_of(cols):
    """The shuffle of rows p (lanes 0-31) and p + 1 (32-63) of 32 columns into the pairs (b[p, j], b[p + 1, j]), j in cols."""
    return ir.Constant(ir.VectorType(ir.IntType(32), 32), [t for j in cols for t in (j, 32 + j)])


# vpunpcklwd / vpunpckhwd of rows p and p + 1 of 32 columns: the (b[p, j], b[p + 1, j]) pairs of columns
# _PAIRED[0] (0-3, 8-11, 16-19, 24-27) and _PAIRED[1], in 128-bit lanes, as vdpbf16ps takes them.
_PAIRED = [[8 * lane + 4 * half + x for lane in range(4) for x in range(4)] for half in (0, 1)]
_INTERLEAVE = [_pairs_of(cols) for cols in _PAIRED]
# Lane of column j in the two accumulators of a 32-column half: out[0:16] and out[16:32] by two shuffles
# (and back by _PAIRED, where a later K chunk adds to the sums).
_UNPAIR = [ir.Constant(ir.VectorType(ir.IntType(32), 16), [_PAIRED[0].index(j) if j in _PAIRED[0] else 16 + _PAIRED[1].index(j)
                                                           for j in range(16 * h, 16 * h + 16)]) for h in (0, 1)]
# Columns 0-15 and 16-31 in order, as AMX's VNNI tiles hold them (a vpermt2w each).
_NATURAL = [_pairs_of(range(16 * h, 16 * h + 16)) for h in (0, 1)]


def _masked_load(builder, vector):
    """llvm.masked.load of a 64-byte vector type (pointer, alignment, mask, value of the lanes masked off)."""
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(
        vector, [vector.as_pointer(), ir.IntType(32), ir.VectorType(ir.IntType(1), vector.count), vector]),
        f"llvm.masked.load.v{vector.count}{'f32' if vector.element == ir.FloatType() else 'i16'}.p0")


# ---------------------------------------------------------------- packing

@njit(parallel=True, cache=True, error_model="numpy")
def _pack_p(a, dst):
    """dst[t, s, i, q] = a[16 t + i, 32 s + q]: P's 16 x 32 tiles, 1 KB each; dst is zeroed (the tails stay 0)."""
    rows, k = a.shape
    for t in prange(dst.shape[0]):
        for i in range(min(16, rows - 16 * t)):
            for s in range(dst.shape[1]):
                for q in range(min(32, k - 32 * s)):
                    dst[t, s, i, q] = a[16 * t + i, 32 * s + q]


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _pack_tile(src, trans, first, cols, s, out):
    """out [16, 16] (uint32) = the VNNI tile of Q's rows first .. first + cols - 1 and K chunk s: out[r, j] holds
    Q[first + j, 32 s + 2 r] in its low and Q[first + j, 32 s + 2 r + 1] in its high half; pairs past K are
    zeroed, columns past cols left alone. Q is src [J, K], or src.T when trans (B [K, N] row-major: two
    rows of B interleave into a tile row, a vector loop over contiguous columns)."""
    k = src.shape[0] if trans else src.shape[1]
    ks = min(32, k - 32 * s)
    if trans:
        for r in range(ks // 2):
            low, high = src[32 * s + 2 * r, first:first + cols], src[32 * s + 2 * r + 1, first:first + cols]
            for j in range(cols):
                out[r, j] = U32(np.uint16(low[j])) | (U32(np.uint16(high[j])) << U32(16))
        if ks % 2:
            low = src[32 * s + ks - 1, first:first + cols]
            for j in range(cols):
                out[ks // 2, j] = U32(np.uint16(low[j]))
    else:
        for j in range(cols):
            row = src[first + j, 32 * s:32 * s + ks]
            for r in range(ks // 2):
                out[r, j] = U32(np.uint16(row[2 * r])) | (U32(np.uint16(row[2 * r + 1])) << U32(16))
            if ks % 2:
                out[ks // 2, j] = U32(np.uint16(row[ks - 1]))
    out[(ks + 1) // 2:] = 0


@intrinsic
def _pack_rows(typingctx, b, k0, n0, cols, dst, tile_stride):
    """The VNNI tiles of B's rows k0 .. k0 + 31 and columns n0 .. n0 + 31 (b [K, N] bfloat16, int16 view,
    rows with a unit stride): columns 0-15 to the 1 KB tile at address dst, 16-31 at dst + tile_stride;
    columns from cols on, and rows past K, are 0. What _pack_tile does for two tiles, in vectors: per pair
    of rows two 64-byte loads, two word permutes, two 64-byte stores."""
    sig = types.void(b, k0, n0, cols, dst, tile_stride)

    def codegen(context, builder, sig, args):
        array = context.make_array(sig.args[0])(context, builder, args[0])
        k0, n0, cols, dst, tile_stride = (context.cast(builder, v, t, types.int64) for v, t in zip(args[1:], sig.args[1:]))
        shape, strides = cgutils.unpack_tuple(builder, array.shape), cgutils.unpack_tuple(builder, array.strides)
        i32, one = ir.IntType(32), ir.Constant(_I64, 1)
        masked_load = _masked_load(builder, _V32S)
        mask = lanes_below(builder, cols, 32)
        base = builder.add(builder.ptrtoint(array.data, _I64), builder.mul(n0, ir.Constant(_I64, 2)))
        rows = builder.sub(shape[0], k0)
        rows = builder.select(builder.icmp_signed("<", rows, ir.Constant(_I64, 32)), rows, ir.Constant(_I64, 32))
        zero = ir.Constant(_V32S, None)

        def row(p):
            address = builder.add(base, builder.mul(builder.add(k0, p), strides[0]))
            return builder.call(masked_load, [builder.inttoptr(address, _V32S.as_pointer()), ir.Constant(i32, 2), mask, zero])

        with cgutils.for_range(builder, ir.Constant(_I64, 16)) as loop:
            r = loop.index
            p = builder.mul(r, ir.Constant(_I64, 2))
            has_low = builder.icmp_signed("<", p, rows)
            has_high = builder.icmp_signed("<", builder.add(p, one), rows)
            low, high = cgutils.alloca_once_value(builder, zero), cgutils.alloca_once_value(builder, zero)
            with builder.if_then(has_low):
                builder.store(row(p), low)
            with builder.if_then(has_high):
                builder.store(row(builder.add(p, one)), high)
            lo, hi = builder.load(low), builder.load(high)
            for h in range(2):
                words = builder.shuffle_vector(lo, hi, _NATURAL[h])
                address = builder.add(builder.add(dst, builder.mul(r, ir.Constant(_I64, 64))), builder.mul(ir.Constant(_I64, h), tile_stride))
                builder.store(words, builder.inttoptr(address, _V32S.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def _pack_q(src, trans, firsts, ends, dst):
    """dst[t, s] = the VNNI tile of Q's rows firsts[t] .. ends[t] - 1 (at most 16) and K chunk s; dst is
    zeroed (columns past ends[t] stay 0). Consecutive tasks follow src's rows; row-major B (src's rows
    contiguous) goes by pairs of tiles in vectors (_pack_rows; 2048 x 4000 per core: 2.3 ms, by scalar loops 3.3)."""
    n_t, n_s = dst.shape[0], dst.shape[1]
    if trans and src.strides[1] == src.itemsize:
        pairs = n_t // 2  # segments start at even tiles
        for task in prange(pairs * n_s):
            t, s = task % pairs * 2, task // pairs
            _pack_rows(src, 32 * s, firsts[t], min(32, ends[t] - firsts[t]), dst[t, s].ctypes.data, n_s * 1024)
        return
    for task in prange(n_t * n_s):
        t, s = (task % n_t, task // n_t) if trans else (task // n_s, task % n_s)
        _pack_tile(src, trans, firsts[t], min(16, ends[t] - firsts[t]), s, dst[t, s])


def packed_q(src, trans, starts, ends):
    """The rows [starts[e], ends[e]) of Q (src [J, K], or src.T [K, J] when trans; raw bfloat16 views, any
    strides) in VNNI tiles [tiles, K / 32 rounded up, 16 pairs, 16], each segment from a new pair of tiles
    (the microkernel takes 32 columns at a time); also the first tile of each segment."""
    counts = -(-(ends - starts) // 32) * 2
    first_tile = np.concatenate(([0], np.cumsum(counts)))
    segment = np.repeat(np.arange(len(starts)), counts)
    firsts = starts[segment] + 16 * (np.arange(first_tile[-1]) - first_tile[segment])
    dst = aligned((first_tile[-1], -(-src.shape[0 if trans else 1] // 32), 16, 16), np.uint32, zeroed=True)
    _pack_q(src, trans, firsts, ends[segment], dst)
    return dst, first_tile


# ---------------------------------------------------------------- gemm: T = A B with the epilogue per block

# Blocking (2 cores, 48 KB L1d and 2 MB L2 each): a task owns an _MC (packing B per task: up to
# _FUSED_MC) x _NC block of the output; per
# _KC chunk of K its A panel (_MC x _KC bf16) and B panel (_KC x _NC) stay in L2, and a 32-row strip of
# the A panel (16 KB) stays in L1 while the B tiles stream by. A microkernel step (four tdpbf16ps, 4 KB of
# 64-byte aligned tiles) took 21.5 ns from L1 and 26-28.5 ns from L2, the tdpbf16ps alone 17.4-18.4 ns
# (measured earlier: _KC = 512, 32 KB strips, ~15% slower).
_MC, _NC, _KC = 128, 256, 256
_PAD = 16  # floats past nc per row of a task's block: the 16 rows of a C tile fall in different L1 sets
# Fused tasks of at most _MC rows (decode, small batches) wait on B's rows coming from memory as they are
# packed: _FEW_ROWS_NC columns read 2 KB runs of each row instead of 512 B. Per core, interleaved (CPU ms,
# shared host), nc = 256 / 512 / 1024 / 2048: 16 x 4096 x 4096 4.8 / 3.3-3.6 / 3.2-3.5 / 3.4, 32 x 4096 x 14336
# 20.5 / 17.9-18.2 / 16.7 / 16.3, 128 x 4096 x 4096 6.8 / 6.5-7.8 / 5.8-7.3 / 7.2, 64 x 14336 x 4096 - / 22.1 /
# 20.5 / 19.5; past 1024 too few tasks are left for two cores (N = 4096: 2).
_FEW_ROWS_NC = 1024
# B packed up front costs a write and a read of all of B besides the product; packed by each task
# (of up to _FUSED_MC rows) it crosses memory once but is packed once per task row. Measured: packing
# per task wins from 32 MB of B (4096^3: 1.00x vs 0.84x torch; 1024 x 14336 x 4096: 1.21x vs 0.76x),
# loses at 8 MB (2048^3: 0.76x vs 0.97-1.19x). Past _FUSED_MC rows, with at least two column panels per
# thread, a task is a column panel of all M ("whole"): its panel (all of K) packed once, while its first
# block of rows runs, and reused by the others, so B is packed once in all instead of once per block row.
# Against per-task packing (4096^3) and B packed up front (2048^3), interleaved on a shared host: one core
# 142-163 against 152-173 ms and 19.1 against 20.2 ms; two threads' CPU time 151-172 against 178-183 ms
# and 18.1 against 21.1 ms (tasks of 512 x 512 ran 0.9x as long at 4096^3, 1.1x at 2048^3 and
# 1024 x 14336 x 4096).
_FUSED_B_BYTES, _FUSED_MC = 16 << 20, 1024


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def epilogue_rows(acc, a0, rows, cols, out, r0, c0, bias, c, alpha, beta, act):
    """out[r0 + i, c0 + j] = act(alpha * acc[a0 + i, j] + bias[c0 + j]) + beta * c[r0 + i, c0 + j] for i < rows,
    j < cols (rows clipped to out), acc float32 (overwritten; it may be out itself). Row slices keep the
    loops vectorizable."""
    for i in range(min(rows, out.shape[0] - r0)):
        v = acc[a0 + i, :cols]
        for j in range(cols):
            v[j] *= alpha
        if bias is not None:
            bs = bias[c0:c0 + cols]
            for j in range(cols):
                v[j] += load(bs, j)
        activate_row(v, cols, act)
        if c is not None:
            cs = c[r0 + i, c0:c0 + cols]
            for j in range(cols):
                v[j] += beta * load(cs, j)
        o = out[r0 + i, c0:c0 + cols]
        for j in range(cols):
            store(o, j, v[j])


_scratch = threading.local()


def _workspace(name, shape, dtype):
    """An uninitialized buffer of `shape`, kept between calls (one per name and Python thread, grown on
    demand): the driver's per-task float32 block and B panel, allocated per task (1.1 MB and a zeroed
    128 KB at 1024 rows), took per core 182 against 143 ms at 1024 x 4096 x 14336 + silu (56 tasks), 38
    against 36 at 1024 x 4096 x 4096 (interleaved, operands aligned in both)."""
    size = int(np.prod(shape))
    buf = getattr(_scratch, name, None)
    if buf is None or buf.size < size or buf.dtype != dtype:
        buf = aligned((size,), dtype)
        setattr(_scratch, name, buf)
    return buf[:size].reshape(shape)


@njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def _amx_gemm_kernel(ap, bp, b, trans, out, bias, c, alpha, beta, act, mc, whole, blocks, panels):
    """out = act(alpha * A B + bias) + beta * c from A's packed tiles ap and B's VNNI tiles bp, parallel
    over mc x nc output blocks. bp None: every task packs its own B panel from b (src of _pack_tile)
    per K chunk into L2, so B crosses memory once per row of blocks; whole: a task is a column panel
    and goes down all of M's blocks, its panel (all of K) packed in the first and reused in the others.
    blocks[thread] holds a task's float32 sums (nc + _PAD per row: nc is read from it), panels[thread]
    its B panel (columns past N may hold stale values: they only reach sums that are never stored)."""
    m, n = out.shape
    steps = ap.shape[1]
    kc = _KC // 32
    ldc = blocks.shape[2]
    nc = ldc - _PAD
    mb, nb = -(-m // mc), -(-n // nc)
    a_base = ap.ctypes.data
    rows = trans and b.strides[1] == b.itemsize  # B's rows contiguous: packed by vectors
    tasks = nb if whole else mb * nb
    for task in prange(tasks):
        thread = numba.get_thread_id()
        block = blocks[thread]
        address = block.ctypes.data
        panel = panels[thread] if bp is None else bp
        _amx_begin()
        for mi in range(mb if whole else 1):
            m0, n0 = (mi * mc, task * nc) if whole else (task % mb * mc, task // mb * nc)
            mw, nw = min(mc, m - m0), min(nc, n - n0)
            b_base, b_tiles = (panel.ctypes.data, panel.shape[1]) if bp is None else (bp.ctypes.data + n0 // 16 * steps * 1024, steps)
            for s0 in range(0, max(steps, 1), kc):
                chunk = min(kc, steps - s0)
                p0 = s0 if whole or bp is not None else 0  # the chunk's first tile in the panel
                if bp is None and mi == 0:
                    for s in range(s0, s0 + chunk):  # tiles side by side read whole lines of B's rows
                        q = s - s0 + p0
                        for t in range(0, -(-nw // 16), 2 if rows else 1):
                            if rows:
                                _pack_rows(b, 32 * s, n0 + 16 * t, min(32, nw - 16 * t), panel[t, q].ctypes.data, b_tiles * 1024)
                            else:
                                _pack_tile(b, trans, n0 + 16 * t, min(16, nw - 16 * t), s, panel[t, q])
                for i in range(0, mw, 32):
                    a0 = a_base + ((m0 + i) // 16 * steps + s0) * 1024
                    for j in range(0, nw, 32):
                        b0 = b_base + (j // 16 * b_tiles + p0) * 1024
                        _amx_tiles(a0, a0 + steps * 1024, 64, 1024, b0, b0 + b_tiles * 1024, chunk,
                                   address + (i * ldc + j) * 4, ldc * 4, s0 > 0)
                    if s0 + kc >= steps:
                        epilogue_rows(block, i, 32, nw, out, m0 + i, n0, bias, c, alpha, beta, act)
        _amx_end()


def amx_gemm(a, b, out, bias, c, alpha, beta, act):
    """out = act(alpha * (a @ b) + bias) + beta * c for bfloat16 a [M, K], b [K, N] (raw int16 views, any strides)."""
    m, k = a.shape
    ap = aligned((-(-m // 32) * 2, -(-k // 32), 16, 32), np.int16, zeroed=True)
    _pack_p(a, ap)
    trans = b.strides[1] <= b.strides[0]  # B's rows contiguous: interleave them, else pack the rows of B^T
    src = b if trans else b.T
    threads = numba.config.NUMBA_NUM_THREADS
    whole = m > _FUSED_MC and -(-b.shape[1] // _NC) >= 2 * threads  # a task per column panel, B packed once (see _FUSED_MC)
    fused = whole or m <= _MC or b.nbytes >= _FUSED_B_BYTES
    mc = min(-(-m // 32) * 32, _FUSED_MC) if fused else _MC
    bp = None if fused else packed_q(src, trans, np.zeros(1, np.int64), np.full(1, b.shape[1], np.int64))[0]
    nc = _FEW_ROWS_NC if mc <= _MC else _NC
    blocks = _workspace("blocks", (threads, mc, nc + _PAD), np.float32)
    tiles = k // 32 + 1 if whole else _KC // 32  # K chunks per panel; whole: not 2^n KB apart, its column tiles in different L2 sets
    panels = _workspace("panels", (threads, nc // 16, tiles, 16, 16) if fused else (threads, 0, 0, 16, 16), np.uint32)
    _amx_gemm_kernel(ap, bp, src, trans, out, bias, c, np.float32(alpha), np.float32(beta), act, mc, whole, blocks, panels)


# ---------------------------------------------------------------- register-tiled gemm: bfloat16 (vdpbf16ps) and float32 (FMA)

# The microkernel (`_strip`): a register tile of up to _DP_MR rows of a x _STRIP columns of b in
# _DP_MR x 4 accumulators of 16 float32 (24 of the 32 zmm registers); per step of k 4 loads of b and one
# broadcast of a per row feed 24 vdpbf16ps (bfloat16: a step is a pair of b's rows, unpacked into pairs)
# or 24 vfmadd231ps (float32: one row of b). Zen 4 issues one 512-bit vdpbf16ps or FMA a cycle (as two
# 256-bit halves): with its operands in L1 or L2 the bfloat16 tile ran 0.273-0.280 ns per vdpbf16ps
# (32 products), 230 GFLOP/s a core; 6 x 64 needs the fewest loads per instruction of the tiles that fit.
_DP_MR, _STRIP = 6, 64
# Up to _STREAM_M rows (decode) the product is bound by reading b once: its pairs go to vdpbf16ps straight
# from its rows, with no packing pass. A task: _STREAM_NC columns, b by chunks of _STREAM_KC rows; the first
# pass over a strip prefetches the same rows _STREAM_AHEAD strips on. b's rows are 8-28 KB apart, one page
# each: fewer rows per chunk keep the streams few enough for the hardware prefetcher. Measured per core
# (CPU ms, shared host), M = 1 / 8 x 4096 x 14336: _STREAM_KC = 64: 13-16 / 24-30, 32: 13-17 / 24-28, 16:
# 9-14 / 19, 8: 11 / 19 (but 16 x 4096 x 4096 9.1 against 6.7-7.1); prefetching 2 / 4 / 8 strips ahead
# 9.3 / 10-14 / 14; no prefetch at _STREAM_KC = 64 cost 10-40%.
_STREAM_NC, _STREAM_KC, _STREAM_AHEAD = 1024, 16, 4
_STREAM_M = 32
# Past _STREAM_M rows the product is compute-bound (4096 x 4096 per core, M = 32: 8.2 ms with decode's
# blocks, 8.8 with these; M = 64: 15.0 against 13.5), and a task is a block of MC rows x NC columns, by
# chunks of KC rows of b: the first group of rows unpacks (or copies) each strip of b into the task's
# panel (KC x NC, in L2) and the block's other groups read it there, each group sweeping the panel's
# strips with its 6 x KC slice of a in L1. With K <= KC a group's 6 x NC tile is final after one pass and
# takes the epilogue at once, in L1; a longer K keeps the block's sums in memory between chunks.
# bfloat16 (a's slice 24 KB): per core (CPU ms, shared host, torch's oneDNN in the same run), 2048^3:
# MC, NC, KC = 1024, 256, 512: 82, 1024, 128, 2048: 78, 2048, 128, 2048: 78 (torch 80-81); 1024 x 14336 x
# 4096: 1024, 128, 2048: 554, 1024, 256, 1024: 557, 512, 256, 1024: 566, 1024, 128, 4096: 559 (torch 573).
# All shapes 0.290-0.295 ns per vdpbf16ps, 5-7% over the tile alone: the first group's unpacking from
# memory (twice a group's time, 1 group in 170), the epilogue, the tile's start and end. On two threads
# 1024, 128, 2048 (32 tasks at 2048^3, each panel of b unpacked by two of them) stayed 3-6% behind torch;
# a wider task halves the unpacking and a's reloads (a group's slice serves 4 strips), though its panel
# (1 MB) no longer fits L2 beside the slice. Two threads, wall ms, min / median of 12-16 interleaved
# rounds on a shared host, 2048^3: 1024, 128, 2048: 45.9 / 50.6 (a busier moment: 85.7 / 94.8), 2048,
# 128, 2048: 41.4 / 44.2 (82.8 / 89.1), 1024, 256, 2048: 42.5 / 43.7 (82.2 / 87.0), 2048, 256, 2048: 41.8
# / 43.0 (80.1 / 85.9), torch 43.2 / 44.7 (83.4 / 93.3); 4096^3: 1024, 128, 2048: 678 / 696, 2048, 256,
# 2048: 648 / 659, torch 715 / 734; 1024 x 14336 x 4096: 597 / 606 against 578 / 599, torch 647 / 675;
# one thread (CPU ms, min of 4-5), 2048^3 / 1024 x 4096 x 14336 / 1024 x 14336 x 4096: 1024, 128, 2048:
# 83.8-84.3 / 573 / 576, 2048, 256, 2048: 80.3-81.6 / 567 / 567, torch 83.9-84.1 / 607 / 605.
# float32 keeps the panel in L2 (KC 1024: 512 KB, a's slice 24 KB). Per core (CPU ms, shared host),
# MC, NC, KC = 1024, 128, 512 / 1024, 128, 1024 / 1024, 64, 1024 / 2048, 128, 1024 / 512, 128, 1024 /
# 1024, 192, 512: 1024^3 + silu 21.6 / 21.2 / 21.3 / 21.2 / 21.8 / 22.0, 2048^3 + silu 173.9 / 168.9 /
# 175.0 / 168.1 / 171.3 / 176.3, 1024 x 4096 x 4096 + silu 340 / 331 / 349 / 334 / 344 / 341: 0.31-0.32 ns
# per 16-lane FMA with the epilogue, as fast as OpenBLAS's sgemm without one (20.9 / 164 ms at 1024^3 /
# 2048^3), whose separate epilogue pass the fused tile saves (kernels._SMALL_M_FMA32). Two threads (wall
# ms, min of 6, shared host), 1024^3 / 2048^3 + gelu_tanh: 1024, 128, 1024: 21.6 / 84.3, 2048, 128, 1024:
# 21.4 / 83.0, 2048, 256, 1024: 21.6 / 83.1, 2048, 256, 512: 22.3 / 84.1.
_DP_BLOCKS = {np.dtype(np.int16): (2048, 256, 2048), np.dtype(np.float32): (2048, 128, 1024)}  # (MC, NC, KC) by a's raw dtype
_TASKS_PER_THREAD = 2  # at least, where M allows: a narrow N (one or two column blocks) is split by rows


def _pointers(context, builder, sig, args):
    """The data pointers of the array arguments, every other argument as an i64."""
    return [context.make_array(t)(context, builder, v).data if isinstance(t, types.Array) else context.cast(builder, v, t, types.int64)
            for t, v in zip(sig.args, args)]


# The tile's element formats, by a's (and b's, or w's) raw dtype: k per step of the tile (bfloat16: a pair,
# its <32 x i16> loads of b's rows unpacked into <16 x i32> pairs for vdpbf16ps; float32: one k, its
# <16 x float> loads of b used as they are) and the type of a 64-byte load of b.
_FORMATS = {types.int16: (2, _V32S), types.float32: (1, _V16F)}


@intrinsic
def _strip(typingctx, a, a_off, lda, rows, b, b_off, ldb, steps, odd, cols, packed, repeat, acc, acc_off, ldacc, accumulate):
    """acc[acc_off + i * ldacc + j] (+= if accumulate) sum over p < kstep * steps + odd of a[a_off + i * lda + p]
    * b[b_off + p * ldb + j] for i < rows (1 .. _DP_MR) and j < _STRIP, in float32, for bfloat16 (int16
    views, kstep 2) or float32 (kstep 1) a and b. b's columns from cols on are read as 0 (masked loads, j <
    cols only); bfloat16 only: odd is K's last, odd row, and a's row must hold a 0 after it (the odd row's
    pair is (a, 0) against (b, 0)). acc holds _STRIP columns. Per step of k: 4 loads of 64 bytes of b
    (bfloat16: 4 word unpacks of 2 rows into pairs), one broadcast of a per row and 4 vdpbf16ps or FMAs
    per row. b's vectors also go to packed (int32, _STRIP per k step), which the strip's next groups of
    rows read instead of b (repeat): b's rows 4-8 KB apart (N = 2048-4096) would all fall in the same L1
    sets, so a strip of them is read from L2 again (bfloat16 M = 16 took 4x as long)."""
    sig = types.void(a, a_off, lda, rows, b, b_off, ldb, steps, odd, cols, packed, repeat, acc, acc_off, ldacc, accumulate)
    kstep, vector = _FORMATS[a.dtype]
    bf16 = kstep == 2

    def codegen(context, builder, sig, args):
        (pa, a_off, lda, rows, pb, b_off, ldb, steps, odd, cols, ppk, repeat, pacc, acc_off, ldacc,
         accumulate) = _pointers(context, builder, sig, args)
        i32, one = ir.IntType(32), ir.Constant(_I64, 1)
        word = _V16I if bf16 else _V16F  # a 64-byte vector of packed
        if bf16:
            dot = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F, [_V16F, _V16I, _V16I]),
                                                 "llvm.x86.avx512bf16.dpbf16ps.512")
            mac = lambda total, x, y: builder.call(dot, [total, x, y])
        else:
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(_V16F, [_V16F] * 3), "llvm.fma.v16f32")
            mac = lambda total, x, y: builder.call(fma, [x, y, total])
        masked_load = _masked_load(builder, vector)
        lanes, size = vector.count, 64 // vector.count
        pa, pb, pacc = builder.gep(pa, [a_off]), builder.gep(pb, [b_off]), builder.gep(pacc, [acc_off])
        i8p = ir.IntType(8).as_pointer()
        masks = [lanes_below(builder, builder.sub(cols, ir.Constant(_I64, lanes * h)), lanes) for h in range(_STRIP // lanes)]
        zero = ir.Constant(vector, None)

        def b_row(p, masked):
            """Row p of the strip as 64-byte vectors."""
            row = builder.gep(pb, [builder.mul(p, ldb)])
            ptrs = [builder.bitcast(builder.gep(row, [ir.Constant(_I64, lanes * h)]), vector.as_pointer()) for h in range(len(masks))]
            if masked:
                return [builder.call(masked_load, [ptrs[h], ir.Constant(i32, size), masks[h], zero]) for h in range(len(masks))]
            ahead = builder.bitcast(builder.gep(row, [ir.Constant(_I64, _STREAM_AHEAD * _STRIP)]), i8p)
            for line in range(0, _STRIP * size, 64):
                prefetch_line(builder, builder.gep(ahead, [ir.Constant(_I64, line)]), False)
            return [builder.load(ptrs[h], align=size) for h in range(len(masks))]

        def step(accs, n_rows, p, b_rows=None):
            """accs += b's rows at k = p (b_rows: p's, and p + 1's for bfloat16; or None: from packed) times a's at p."""
            slots = [builder.bitcast(builder.gep(ppk, [builder.add(builder.mul(p, ir.Constant(_I64, _STRIP // kstep)), ir.Constant(_I64, 16 * v))]),
                                     word.as_pointer()) for v in range(4)]
            if b_rows is None:
                words = [builder.load(x, align=4) for x in slots]
            else:
                words = ([builder.bitcast(builder.shuffle_vector(b_rows[0][h], b_rows[1][h], _INTERLEAVE[q]), _V16I) for h in range(2)
                          for q in range(2)] if bf16 else b_rows[0])
                for x, v in zip(words, slots):
                    builder.store(x, v, align=4)
            for i in range(n_rows):
                element = builder.gep(pa, [builder.add(builder.mul(ir.Constant(_I64, i), lda), p)])
                scalar = builder.load(builder.bitcast(element, i32.as_pointer()) if bf16 else element, align=size)  # a's pair, or a[i, p]
                splat = builder.shuffle_vector(builder.insert_element(ir.Constant(word, None), scalar, ir.Constant(i32, 0)),
                                               ir.Constant(word, None), ir.Constant(_V16I, [0] * 16))
                for v in range(4):
                    builder.store(mac(builder.load(accs[i][v]), splat, words[v]), accs[i][v])

        def b_rows(p, masked):
            """step()'s b_rows: row p of the strip (bfloat16: rows p and p + 1)."""
            return [b_row(p, masked), b_row(builder.add(p, one), masked)] if bf16 else [b_row(p, masked)]

        def tile(n_rows):
            out = [[builder.bitcast(builder.gep(pacc, [builder.add(builder.mul(ir.Constant(_I64, i), ldacc), ir.Constant(_I64, 16 * v))]),
                                    _V16F.as_pointer()) for v in range(4)] for i in range(n_rows)]
            accs = [[cgutils.alloca_once(builder, _V16F) for _ in range(4)] for _ in range(n_rows)]
            with builder.if_else(builder.trunc(accumulate, ir.IntType(1))) as (adding, fresh):
                with adding:  # (a branch: the loads of a first chunk's sums would miss the caches)
                    for i in range(n_rows):
                        for h in range(2):
                            lo, hi = builder.load(out[i][2 * h], align=4), builder.load(out[i][2 * h + 1], align=4)
                            for q in range(2):  # bfloat16's accumulators hold _PAIRED's columns
                                builder.store(builder.shuffle_vector(lo, hi, ir.Constant(_V16I, _PAIRED[q])) if bf16 else (lo, hi)[q],
                                              accs[i][2 * h + q])
                with fresh:
                    for acc in (acc for row in accs[:n_rows] for acc in row):
                        builder.store(ir.Constant(_V16F, None), acc)
            again = builder.trunc(repeat, ir.IntType(1))
            with builder.if_else(again) as (reread, first):
                with reread:
                    with cgutils.for_range(builder, builder.add(steps, odd)) as loop:
                        step(accs, n_rows, builder.mul(loop.index, ir.Constant(_I64, kstep)))
                with first:
                    full = builder.icmp_signed(">=", cols, ir.Constant(_I64, _STRIP))
                    with builder.if_else(full) as (whole, tail):
                        for masked, branch in ((False, whole), (True, tail)):
                            with branch:
                                with cgutils.for_range(builder, steps) as loop:
                                    p = builder.mul(loop.index, ir.Constant(_I64, kstep))
                                    step(accs, n_rows, p, b_rows(p, masked))
                    if bf16:
                        with builder.if_then(builder.trunc(odd, ir.IntType(1))):  # K's last, odd row against a 0 row
                            p = builder.mul(steps, ir.Constant(_I64, 2))
                            step(accs, n_rows, p, [b_row(p, True), [zero, zero]])
            for i in range(n_rows):
                for h in range(2):
                    lo, hi = builder.load(accs[i][2 * h]), builder.load(accs[i][2 * h + 1])
                    for q in range(2):
                        builder.store(builder.shuffle_vector(lo, hi, _UNPAIR[q]) if bf16 else (lo, hi)[q], out[i][2 * h + q], align=4)

        done = builder.append_basic_block("strip.done")
        switch = builder.switch(rows, done)
        for n_rows in range(1, _DP_MR + 1):
            case = builder.append_basic_block(f"strip.rows{n_rows}")
            switch.add_case(ir.Constant(_I64, n_rows), case)
            builder.position_at_end(case)
            tile(n_rows)
            builder.branch(done)
        builder.position_at_end(done)
        return context.get_dummy_value()

    return sig, codegen


def _transpose16(builder, rows):
    """The 16 x 16 transpose of 16 <16 x i32> rows: four stages swapping the off-diagonal blocks of 8, 4, 2, 1."""
    rows = list(rows)
    for step in (8, 4, 2, 1):
        low = ir.Constant(_V16I, [lane if lane & step == 0 else 16 + lane - step for lane in range(16)])
        high = ir.Constant(_V16I, [lane + step if lane & step == 0 else 16 + lane for lane in range(16)])
        for i in (i for i in range(16) if i & step == 0):
            rows[i], rows[i + step] = (builder.shuffle_vector(rows[i], rows[i + step], low),
                                       builder.shuffle_vector(rows[i], rows[i + step], high))
    return rows


@intrinsic
def _pack_strip(typingctx, w, n0, cols, k0, kw, packed):
    """packed = _strip's vectors of b = w.T (w [N, K] bfloat16 (int16 view) or float32, K contiguous) for b's
    rows k0 .. k0 + kw - 1 and columns n0 .. n0 + _STRIP - 1: per step s of k (a pair, or one k) _STRIP int32
    at s * _STRIP, column j's pair (w[n0 + j, k0 + 2 s], w[n0 + j, k0 + 2 s + 1]) in _PAIRED's order, or its
    w[n0 + j, k0 + s] in order; 0 from column cols on and past kw (the last block of 16 steps is written
    whole). Per 16 steps of 16 columns: 16 masked 64-byte loads of w's rows, a 16 x 16 transpose of their
    32-bit words, 16 stores."""
    sig = types.void(w, n0, cols, k0, kw, packed)
    vector = _FORMATS[w.dtype][1]
    bf16 = w.dtype == types.int16

    def codegen(context, builder, sig, args):
        wa = context.make_array(sig.args[0])(context, builder, args[0])
        n0, cols, k0, kw = (context.cast(builder, v, t, types.int64) for v, t in zip(args[1:5], sig.args[1:5]))
        dst = builder.ptrtoint(context.make_array(sig.args[5])(context, builder, args[5]).data, _I64)
        row_stride = cgutils.unpack_tuple(builder, wa.strides)[0]
        lanes, size = vector.count, 64 // vector.count
        base = builder.add(builder.ptrtoint(wa.data, _I64), builder.add(builder.mul(n0, row_stride), builder.mul(k0, ir.Constant(_I64, size))))
        masked_load = _masked_load(builder, vector)
        zero, none = ir.Constant(vector, None), ir.Constant(ir.VectorType(ir.IntType(1), lanes), None)
        i32, block_k = ir.IntType(32), ir.Constant(_I64, lanes)
        with cgutils.for_range(builder, builder.udiv(builder.add(kw, ir.Constant(_I64, lanes - 1)), block_k)) as loop:
            block = loop.index
            mask = lanes_below(builder, builder.sub(kw, builder.mul(block, block_k)), lanes)
            offset = builder.mul(block, ir.Constant(_I64, 64))
            for v in range(4):  # the 16 columns of accumulator v of a tile row
                rows = []
                for j in ((32 * (v // 2) + col for col in _PAIRED[v % 2]) if bf16 else range(16 * v, 16 * v + 16)):
                    address = builder.add(builder.add(base, builder.mul(ir.Constant(_I64, j), row_stride)), offset)
                    active = builder.select(builder.icmp_signed("<", ir.Constant(_I64, j), cols), mask, none)
                    rows.append(builder.bitcast(builder.call(masked_load, [builder.inttoptr(address, vector.as_pointer()),
                                                                           ir.Constant(i32, size), active, zero]), _V16I))
                for s, words in enumerate(_transpose16(builder, rows)):
                    slot = builder.add(builder.mul(block, ir.Constant(_I64, 16 * _STRIP)), ir.Constant(_I64, s * _STRIP + 16 * v))
                    address = builder.add(dst, builder.mul(slot, ir.Constant(_I64, 4)))
                    builder.store(words, builder.inttoptr(address, _V16I.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def _strip_kernel(a, b, ld, w, k, out, bias, c, alpha, beta, act, mc, nc, kc, blocks, strips):
    """out = act(alpha * a b + bias) + beta * c for a [M, K] bfloat16 (int16, rows contiguous, K + K % 2 wide,
    zero past K) or float32 (rows contiguous) and b [K, N] of a's format: read in place from the flat raw
    buffer b (element [p, j] at p * ld + j), or with w not None b = w.T (w [N, K], K contiguous; b, ld
    unused). Parallel over mc x nc blocks of out: per chunk of kc rows of b every _STRIP-column strip goes
    through the block's rows, in groups of up to _DP_MR, into the task's float32 sums blocks[thread]; its
    vectors are unpacked or copied (from b, by the first group) or packed (from w) into strips[thread],
    which the other groups read. In the last chunk each group's tile takes the epilogue while it is in L1."""
    m, n = out.shape
    lda = a.shape[1]
    kstep = 4 // a.itemsize  # k per step of the tile: a bfloat16 pair, or one float32
    mb = -(-m // mc)
    for task in prange(mb * -(-n // nc)):
        thread = numba.get_thread_id()
        acc, packed = blocks[thread], strips[thread]
        ldacc = acc.shape[1]
        m0, n0 = task % mb * mc, task // mb * nc
        rows, width = min(mc, m - m0), min(nc, n - n0)
        groups = -(-rows // _DP_MR)
        for k0 in range(0, max(k, 1), kc):  # K = 0 runs once: zeros
            kw = min(kc, k - k0)
            if w is not None:
                for j0 in range(0, width, _STRIP):
                    _pack_strip(w, n0 + j0, min(_STRIP, width - j0), k0, kw, packed[j0 // _STRIP])
            for g in range(groups):
                r0, r1 = g * rows // groups, (g + 1) * rows // groups
                row = r0 if k > kc else 0
                for j0 in range(0, width, _STRIP):
                    cols = min(_STRIP, width - j0)
                    _strip(a, (m0 + r0) * lda + k0, lda, r1 - r0, b, k0 * ld + n0 + j0, ld, kw // kstep, kw % kstep, cols,
                           packed[j0 // _STRIP], g > 0 or w is not None, acc, row * ldacc + j0, ldacc, k0 > 0)
                if k0 + kc >= k:
                    epilogue_rows(acc, row, r1 - r0, width, out, m0 + r0, n0, bias, c, alpha, beta, act)


def strip_gemm(a, b, ld, out, bias, c, alpha, beta, act):
    """out = act(alpha * (a @ b) + bias) + beta * c on the register tile (`_strip`) for bfloat16 (raw int16
    views) or float32 a [M, K] (any strides) and b [K, N] of the same format, given as a flat view of a
    row-major b with leading dimension ld, or as w [N, K] (K contiguous; b = w.T, ld None)."""
    m, k = a.shape
    kstep = 4 // a.itemsize
    if k % kstep or a.strides[1] != a.itemsize or a.strides[0] != a.itemsize * k:  # rows contiguous, and a 0 after an odd K
        ap = np.zeros((m, k + k % kstep), a.dtype)
        ap[:, :k] = a
        a = ap
    w, b = (b, np.empty(0, a.dtype)) if b.ndim == 2 else (None, b)
    if m <= _STREAM_M and w is None:
        mc, nc, kc = m, _STREAM_NC, _STREAM_KC
    else:  # row blocks of up to MC rows, more where too few column blocks would leave a thread idle
        mc, nc, kc = _DP_BLOCKS[a.dtype]
        row_blocks = max(-(-m // mc), -(-_TASKS_PER_THREAD * numba.get_num_threads() // max(1, -(-out.shape[1] // nc))))
        mc = -(-m // row_blocks)
    nc = min(nc, -(-out.shape[1] // _STRIP) * _STRIP) or _STRIP
    threads = numba.config.NUMBA_NUM_THREADS
    blocks = _workspace("dp_blocks", (threads, mc if k > kc else _DP_MR, nc), np.float32)
    strips = _workspace("dp_strips", (threads, nc // _STRIP, -(-kc // (16 * kstep)) * 16 * _STRIP), np.uint32)  # _pack_strip's blocks of 16 steps
    _strip_kernel(a, b, ld or 0, w, k, out, bias, c, np.float32(alpha), np.float32(beta), act, mc, nc, kc, blocks, strips)


# ---------------------------------------------------------------- one row times W^T: vdpbf16ps dot products

# M = 1 with b = W.T (W [N, K], K contiguous) is a dot product of x with each row of W, read once in
# place: a register tile of x against _DOT_ROWS rows of W (one 16-lane accumulator each, then moe.py's
# shuffle tree packs their sums into one vector); a task owns _DOT_TASK rows of W.
_DOT_ROWS, _DOT_TASK = 16, 256


@intrinsic
def _dot_rows(typingctx, x, w, n0, n_valid, acc, col):
    """acc[0, col + j] = x . w[n0 + j] in float32 for j < _DOT_ROWS, x [K] and w [N, K] bfloat16 (int16 views, K
    contiguous); rows from n_valid on repeat the last valid one (their sums land past the caller's columns)."""
    sig = types.void(x, w, types.intp, types.intp, acc, types.intp)

    def codegen(context, builder, sig, args):
        xa, wa, acca = (context.make_array(sig.args[i])(context, builder, args[i]) for i in (0, 1, 4))
        n0, n_valid, col = (context.cast(builder, args[i], sig.args[i], types.int64) for i in (2, 3, 5))
        k = cgutils.unpack_tuple(builder, xa.shape)[0]
        row_stride = cgutils.unpack_tuple(builder, wa.strides)[0]
        chunks = Chunks(builder, "bf16dot")
        last = builder.sub(n_valid, ir.Constant(_I64, 1))
        w_base = builder.ptrtoint(wa.data, _I64)

        def row(j):
            """The address of row n0 + j of W, or of its last valid row."""
            index = builder.select(builder.icmp_signed("<", ir.Constant(_I64, j), n_valid), ir.Constant(_I64, j), last)
            return builder.add(w_base, builder.mul(builder.add(n0, index), row_stride))

        rows = [row(j) for j in range(_DOT_ROWS)]
        x_base = builder.ptrtoint(xa.data, _I64)
        accs = [cgutils.alloca_once_value(builder, ir.Constant(_V16F, None)) for _ in range(_DOT_ROWS)]

        def step(offset, mask=None):
            xv = chunks.load(builder.add(x_base, offset), mask)
            for j, row in enumerate(rows):
                builder.store(chunks.accumulate(builder.load(accs[j]), xv, chunks.load(builder.add(row, offset), mask)), accs[j])

        lanes = ir.Constant(_I64, 32)
        full = builder.udiv(k, lanes)
        with cgutils.for_range(builder, full) as loop:
            step(builder.mul(loop.index, ir.Constant(_I64, 64)))
        rest = builder.sub(k, builder.mul(full, lanes))
        with builder.if_then(builder.icmp_signed(">", rest, ir.Constant(_I64, 0))):  # K's tail: one masked chunk
            step(builder.mul(full, ir.Constant(_I64, 64)), lanes_below(builder, rest, 32))
        (sums,) = lane_sums(builder, [builder.load(a) for a in accs])
        target = builder.gep(acca.data, [col])
        builder.store(sums, builder.bitcast(target, _V16F.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@njit(**KERNEL)
def _dot_kernel(x, w, out, bias, c, alpha, beta, act):
    """out[0] = act(alpha * w x + bias) + beta * c[0], parallel over blocks of _DOT_TASK rows of w."""
    n = w.shape[0]
    for t in prange(-(-n // _DOT_TASK)):
        c0 = t * _DOT_TASK
        cols = min(_DOT_TASK, n - c0)
        acc = np.empty((1, _DOT_TASK), np.float32)
        for j in range(0, cols, _DOT_ROWS):
            _dot_rows(x, w, c0 + j, min(_DOT_ROWS, cols - j), acc, j)
        epilogue_rows(acc, 0, 1, cols, out, 0, c0, bias, c, alpha, beta, act)


def dot_gemm(x, w, out, bias, c, alpha, beta, act):
    """out = act(alpha * (x @ w.T) + bias) + beta * c for one bfloat16 row x [1, K] and w [N, K] with K
    contiguous (raw int16 views)."""
    _dot_kernel(np.ascontiguousarray(x[0]), w, out, bias, c, np.float32(alpha), np.float32(beta), act)


# ---------------------------------------------------------------- grouped_gemm: T = W X^T per expert

# A task: _GROUP_ROWS weight rows (the output columns, or half of them gated) x _GROUP_X rows of one
# expert's x; W is read in place, so it comes from memory once when an expert has <= _GROUP_X rows.
# Each microkernel call runs over all of K, storing its 32 x 32 block once, straight to the epilogue:
# chunks of _KC (the block's sums reloaded and stored per chunk from L2) were 20-25% slower per core
# on the bench's gate/up product (K = 2048); the task's _GROUP_X rows measured 64 / 128 / 256 alike.
_GROUP_ROWS, _GROUP_X = 128, 256


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _columns_epilogue(block, x0, out, r0, rows, c0, cols, act, gated):
    """out[r0 + r, c0 + j] = act(T[j, x0 + r]) (gated: act(gate) * up) for the (up to 32) rows of x at block
    column x0: block rows hold 32 output columns per microkernel call, or 16 gate rows then their 16 up rows.
    Gated, act(gate) * up is taken along T's rows (in place in block); then T is transposed by contiguous
    reads of its rows, so the store (and a plain activation) run along output rows as vector loops: 2x
    faster than gathering T's columns per output row (measured 12 vs 27 ms per 3000 gated 32 x 64 blocks),
    which had cost a third of the gated product."""
    n = min(32, rows)
    v = np.empty((32, _GROUP_ROWS), np.float32)
    for j in range(cols):
        row = block[j + (j >> 4 << 4) if gated else j, x0:x0 + n]
        if gated:
            activate_row(row, n, act)
            up = block[j + (j >> 4 << 4) + 16, x0:x0 + n]
            for r in range(n):
                row[r] *= up[r]
        for r in range(n):
            v[r, j] = row[r]
    for r in range(n):
        vr = v[r]
        if not gated:
            activate_row(vr, cols, act)
        o = out[r0 + r, c0:c0 + cols]
        for j in range(cols):
            store(o, j, vr[j])


@njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def _amx_grouped_kernel(w, half, xp, first_tile, starts, ends, tasks, act, gated, out):
    """tasks[t] = (expert, first output column, first x row): out[x rows, columns] = act(x W^T) (or
    act(gate) * up, the up row of output column j being row half + j of W) for that block."""
    n = out.shape[1]
    steps = xp.shape[1]
    lda = w.strides[1]
    per_call = 16 if gated else 32  # output columns per microkernel call
    w_base, x_base = w.ctypes.data, xp.ctypes.data
    for t in prange(tasks.shape[0]):
        e, c0, r0 = tasks[t, 0], tasks[t, 1], tasks[t, 2]
        cols, rows = min(_GROUP_ROWS // (32 // per_call), n - c0), min(_GROUP_X, ends[e] - r0)
        block = np.empty((_GROUP_ROWS, 32), np.float32)  # T for 32 rows of x, in L1 for the epilogue
        address = block.ctypes.data
        tile0 = first_tile[e] + (r0 - starts[e]) // 16
        _amx_begin()
        for x0 in range(0, rows, 32):
            b0 = x_base + (tile0 + x0 // 16) * steps * 1024
            for i in range(0, cols, per_call):
                a0 = w_base + e * w.strides[0] + (c0 + i) * lda
                _amx_tiles(a0, a0 + (half if gated else 16) * lda, lda, 64, b0, b0 + steps * 1024, steps,
                           address + i // per_call * 4096, 128, False)
            _columns_epilogue(block, 0, out, r0 + x0, rows - x0, c0, cols, act, gated)
        _amx_end()


def amx_grouped(x, w, starts, ends, act, gated, out):
    """out[starts[e]:ends[e]] = act(x[those rows] @ w[e].T) (gated: act(gate) * up) for every expert, bfloat16
    x [R, K], w [E, Nw, K] raw int16 views; rows outside the segments are left alone."""
    e_count, nw, k = w.shape
    halves = 2 if gated else 1
    half = nw // halves
    if k % 32 or half % (16 if gated else 32) or w.strides[2] != 2:  # pad W (odd shapes only): the
        padded = aligned((e_count, halves, -(-half // 32) * 32, -(-k // 32) * 32), np.int16, zeroed=True)  # K tail must be 0
        padded[:, :, :half, :k] = w.reshape(e_count, halves, half, k)
        w = padded.reshape(e_count, halves * padded.shape[2], padded.shape[3])
        half = padded.shape[2]
    xp, first_tile = packed_q(x, False, starts, ends)
    cols = _GROUP_ROWS // halves
    n = out.shape[1]
    tasks = [(e, c0, r0) for e in range(e_count) for r0 in range(starts[e], ends[e], _GROUP_X)
             for c0 in range(0, n, cols)]
    with parallel_chunksize(1):  # a task's cost follows its rows of x (moe._tasks)
        _amx_grouped_kernel(w, half, xp, first_tile, starts, ends, np.array(tasks, np.int64).reshape(-1, 3), act, gated, out)
