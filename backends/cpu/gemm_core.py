"""hal's own GEMM driver for bfloat16 on the CPU: AMX tiles, cache blocking, packing, fused epilogue.

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
widened in registers) and gemm widens to float32 for BLAS. HAL_CPU_GEMM=amx|avx512bf16|fma, read
at import, forces a lower rung (for tests); float16 never takes AMX or vdpbf16ps, since rounding it
to bfloat16 would lose three bits.
"""
import ctypes
import os
import sys
import warnings

import llvmlite.binding as llvm
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from .common import CPU_FEATURES, FASTMATH, U32, activate_row, load, store

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


@njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def _pack_q(src, trans, firsts, ends, dst):
    """dst[t, s] = the VNNI tile of Q's rows firsts[t] .. ends[t] - 1 (at most 16) and K chunk s; dst is
    zeroed (columns past ends[t] stay 0). Consecutive tasks follow src's rows."""
    n_t, n_s = dst.shape[0], dst.shape[1]
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
    dst = np.zeros((first_tile[-1], -(-src.shape[0 if trans else 1] // 32), 16, 16), np.uint32)
    _pack_q(src, trans, firsts, ends[segment], dst)
    return dst, first_tile


# ---------------------------------------------------------------- gemm: T = A B with the epilogue per block

# Blocking (2 cores, 48 KB L1d and 2 MB L2 each): a task owns an _MC (packing B per task: up to
# _FUSED_MC) x _NC block of the output; per
# _KC chunk of K its A panel (_MC x _KC bf16) and B panel (_KC x _NC) stay in L2, and a 32-row strip of
# the A panel (16 KB) stays in L1 while the B tiles stream by. Tile loads from L2 run ~4x slower than
# from L1 here, which is what bounds the kernel (measured: _KC = 512, 32 KB strips, ~15% slower).
_MC, _NC, _KC = 128, 256, 256
_LDC = _NC + 16  # floats per row of a task's block: the 16 rows of a C tile fall in different L1 sets
# B packed up front costs a write and a read of all of B besides the product; packed by each task
# (of up to _FUSED_MC rows) it crosses memory once but is packed once per task row. Measured: packing
# per task wins from 32 MB of B (4096^3: 1.00x vs 0.84x torch; 1024 x 14336 x 4096: 1.21x vs 0.76x),
# loses at 8 MB (2048^3: 0.76x vs 0.97-1.19x).
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


@njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def _amx_gemm_kernel(ap, bp, b, trans, out, bias, c, alpha, beta, act, mc):
    """out = act(alpha * A B + bias) + beta * c from A's packed tiles ap and B's VNNI tiles bp, parallel
    over mc x _NC output blocks. bp None: every task packs its own B panel from b (src of _pack_tile)
    per K chunk into L2, so B crosses memory once."""
    m, n = out.shape
    steps = ap.shape[1]
    kc = _KC // 32
    mb, nb = -(-m // mc), -(-n // _NC)
    a_base = ap.ctypes.data
    for task in prange(mb * nb):
        m0, n0 = task % mb * mc, task // mb * _NC
        mw, nw = min(mc, m - m0), min(_NC, n - n0)
        block = np.empty((-(-mw // 32) * 32, _LDC), np.float32)  # the task's float32 sums
        address = block.ctypes.data
        panel = np.zeros((-(-nw // 32) * 2, kc, 16, 16), np.uint32) if bp is None else bp
        b_base, b_tiles = (panel.ctypes.data, kc) if bp is None else (bp.ctypes.data + n0 // 16 * steps * 1024, steps)
        _amx_begin()
        for s0 in range(0, max(steps, 1), kc):
            chunk = min(kc, steps - s0)
            if bp is None:
                for s in range(chunk):  # tiles side by side read whole lines of B's rows
                    for t in range(-(-nw // 16)):
                        _pack_tile(b, trans, n0 + 16 * t, min(16, nw - 16 * t), s0 + s, panel[t, s])
            for i in range(0, mw, 32):
                a0 = a_base + ((m0 + i) // 16 * steps + s0) * 1024
                for j in range(0, nw, 32):
                    b0 = b_base + (j // 16 * b_tiles + (0 if bp is None else s0)) * 1024
                    _amx_tiles(a0, a0 + steps * 1024, 64, 1024, b0, b0 + b_tiles * 1024, chunk,
                               address + (i * _LDC + j) * 4, _LDC * 4, s0 > 0)
                if s0 + kc >= steps:
                    epilogue_rows(block, i, 32, nw, out, m0 + i, n0, bias, c, alpha, beta, act)
        _amx_end()


def amx_gemm(a, b, out, bias, c, alpha, beta, act):
    """out = act(alpha * (a @ b) + bias) + beta * c for bfloat16 a [M, K], b [K, N] (raw int16 views, any strides)."""
    m, k = a.shape
    ap = np.zeros((-(-m // 32) * 2, -(-k // 32), 16, 32), np.int16)
    _pack_p(a, ap)
    trans = b.strides[1] <= b.strides[0]  # B's rows contiguous: interleave them, else pack the rows of B^T
    src = b if trans else b.T
    fused = m <= _MC or b.nbytes >= _FUSED_B_BYTES
    mc = min(-(-m // 32) * 32, _FUSED_MC) if fused else _MC
    bp = None if fused else packed_q(src, trans, np.zeros(1, np.int64), np.full(1, b.shape[1], np.int64))[0]
    _amx_gemm_kernel(ap, bp, src, trans, out, bias, c, np.float32(alpha), np.float32(beta), act, mc)


# ---------------------------------------------------------------- grouped_gemm: T = W X^T per expert

# A task: _GROUP_ROWS weight rows (the output columns, or half of them gated) x _GROUP_X rows of one
# expert's x; W is read in place, so it comes from memory once when an expert has <= _GROUP_X rows.
_GROUP_ROWS, _GROUP_X = 128, 256


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _columns_epilogue(block, x0, out, r0, rows, c0, cols, act, gated):
    """out[r0 + r, c0 + j] = act(T[j, x0 + r]) (gated: act(gate) * up) for the (up to 32) rows of x at block
    column x0: block rows hold 32 output columns per microkernel call, or 16 gate rows then their 16 up rows."""
    v = np.empty(_GROUP_ROWS, np.float32)
    u = np.empty(_GROUP_ROWS, np.float32)
    for r in range(min(32, rows)):
        for j in range(cols):
            v[j] = block[j + (j >> 4 << 4) if gated else j, x0 + r]
        activate_row(v, cols, act)
        o = out[r0 + r, c0:c0 + cols]
        if gated:
            for j in range(cols):
                u[j] = block[j + (j >> 4 << 4) + 16, x0 + r]
            for j in range(cols):
                store(o, j, v[j] * u[j])
        else:
            for j in range(cols):
                store(o, j, v[j])


@njit(parallel=True, cache=True, fastmath=FASTMATH, error_model="numpy")
def _amx_grouped_kernel(w, half, xp, first_tile, starts, ends, tasks, act, gated, out):
    """tasks[t] = (expert, first output column, first x row): out[x rows, columns] = act(x W^T) (or
    act(gate) * up, the up row of output column j being row half + j of W) for that block."""
    n = out.shape[1]
    steps = xp.shape[1]
    kc = _KC // 32
    lda = w.strides[1]
    per_call = 16 if gated else 32  # output columns per microkernel call
    w_base, x_base = w.ctypes.data, xp.ctypes.data
    for t in prange(tasks.shape[0]):
        e, c0, r0 = tasks[t, 0], tasks[t, 1], tasks[t, 2]
        cols, rows = min(_GROUP_ROWS // (32 // per_call), n - c0), min(_GROUP_X, ends[e] - r0)
        block = np.empty((_GROUP_ROWS, -(-rows // 32) * 32), np.float32)  # the task's float32 sums of T
        address = block.ctypes.data
        ldc = block.shape[1]
        tile0 = first_tile[e] + (r0 - starts[e]) // 16
        _amx_begin()
        for s0 in range(0, max(steps, 1), kc):
            chunk = min(kc, steps - s0)
            for x0 in range(0, rows, 32):
                b0 = x_base + ((tile0 + x0 // 16) * steps + s0) * 1024
                for i in range(0, cols, per_call):
                    a0 = w_base + e * w.strides[0] + (c0 + i) * lda + s0 * 64
                    a1 = a0 + (half if gated else 16) * lda
                    _amx_tiles(a0, a1, lda, 64, b0, b0 + steps * 1024, chunk,
                               address + (i // per_call * 32 * ldc + x0) * 4, ldc * 4, s0 > 0)
                if s0 + kc >= steps:
                    _columns_epilogue(block, x0, out, r0 + x0, rows - x0, c0, cols, act, gated)
        _amx_end()


def amx_grouped(x, w, starts, ends, act, gated, out):
    """out[starts[e]:ends[e]] = act(x[those rows] @ w[e].T) (gated: act(gate) * up) for every expert, bfloat16
    x [R, K], w [E, Nw, K] raw int16 views; rows outside the segments are left alone."""
    e_count, nw, k = w.shape
    halves = 2 if gated else 1
    half = nw // halves
    if k % 32 or half % (16 if gated else 32) or w.strides[2] != 2:  # pad W (odd shapes only): the
        padded = np.zeros((e_count, halves, -(-half // 32) * 32, -(-k // 32) * 32), np.int16)  # K tail must be 0
        padded[:, :, :half, :k] = w.reshape(e_count, halves, half, k)
        w = padded.reshape(e_count, halves * padded.shape[2], padded.shape[3])
        half = padded.shape[2]
    xp, first_tile = packed_q(x, False, starts, ends)
    cols = _GROUP_ROWS // halves
    n = out.shape[1]
    tasks = [(e, c0, r0) for e in range(e_count) for r0 in range(starts[e], ends[e], _GROUP_X)
             for c0 in range(0, n, cols)]
    _amx_grouped_kernel(w, half, xp, first_tile, starts, ends, np.array(tasks, np.int64).reshape(-1, 3), act, gated, out)
