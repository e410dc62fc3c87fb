"""CPU kernels: MoE routing, the expert-sorted token layout, and grouped GEMM (see ops/moe.py).

Routing, the align pass and the permutes are Numba loops. grouped_gemm and grouped_gemm_masked (the
same kernels over their experts' row segments) are parallel Numba kernels over (expert, block of
output columns) tasks whose inner tile is LLVM IR built here: for float16 / bfloat16 a dot-product tile
that reads them in their own format (AVX512-BF16 dot products where the host has them; AMX tiles in
gemm_core), for float32 on AVX-512 a broadcast tile over x packed into panels. The activation (plain
or gated, hal.codes) is fused into the epilogue.
"""
import numpy as np
from llvmlite import ir
from numba import njit, parallel_chunksize, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from hal.codes import activation_code
from hal.dtypes import INTS
from hal.ops.moe import masked_counts

from . import gemm_core
from .common import (CPU_FEATURES, F32, FASTMATH, HELPER, KERNEL, Chunks, Kernel, activate_row, as_rows, exp, f32_bits, lane_sums, load,
                     outside_segments, raw_view, store)

# ---------------------------------------------------------------- moe_route


@njit(cache=True, error_model="numpy")
def _scores(logits, t, sigmoid, out):
    """Softmax or sigmoid scores of row t in float32, without fast-math reassociation: equal logits
    must give bit-equal scores wherever they sit in the row (vector body or tail), so ties stay ties."""
    e = out.shape[0]
    if sigmoid:
        for j in range(e):
            out[j] = F32(1.0) / (F32(1.0) + exp(-load(logits, (t, j))))
        return
    m = F32(-np.inf)
    for j in range(e):
        v = load(logits, (t, j))
        m = v if v > m else m
    total = F32(0.0)
    for j in range(e):
        z = exp(load(logits, (t, j)) - m)
        out[j] = z
        total += z
    for j in range(e):
        out[j] = out[j] / total


@njit(**HELPER)
def _rank(v):
    """An int32 ordered as torch.topk orders float32 v: NaN above +inf (NaNs equal), -0.0 equal to 0.0.
    The selection compares these: integer compares, and no NaN test in the argmax loops."""
    if v != v:
        return np.int32(0x7FFFFFFF)
    b = np.int32(f32_bits(v + F32(0.0)))  # + 0.0 turns -0.0 into 0.0
    return b ^ ((b >> np.int32(31)) & np.int32(0x7FFFFFFF))  # negative: flip the magnitude bits


@njit(**HELPER)
def _best(ranks, allowed):
    """Index of the largest allowed rank, the lowest index among equals (-1 if none allowed)."""
    best = -1
    for j in range(ranks.shape[0]):
        if allowed[j] and (best < 0 or ranks[j] > ranks[best]):
            best = j
    return best


@njit(parallel=True, cache=True, error_model="numpy")
def _route_kernel(logits, bias, sigmoid, n_group, topk_group, renormalize, scaling, weights, ids):
    tokens, e = logits.shape
    k = ids.shape[1]
    for t in prange(tokens):
        scores = np.empty(e, np.float32)
        _scores(logits, t, sigmoid, scores)
        s = scores.copy()  # selection values: scores + bias
        if bias is not None:
            for j in range(e):
                s[j] += load(bias, j)
        rank = np.empty(e, np.int32)
        for j in range(e):
            rank[j] = _rank(s[j])
        allowed = np.ones(e, np.bool_)
        if n_group > 0:  # DeepSeek-V3: keep the topk_group groups with the best sum of their top two
            size = e // n_group  # >= 2
            group = np.empty(n_group, np.int32)
            for g in range(n_group):
                first = second = -1
                for j in range(g * size, (g + 1) * size):
                    if first < 0 or rank[j] > rank[first]:
                        first, second = j, first
                    elif second < 0 or rank[j] > rank[second]:
                        second = j
                group[g] = _rank(s[first] + s[second])
            kept = np.zeros(n_group, np.bool_)
            free = np.ones(n_group, np.bool_)
            for _ in range(topk_group):
                g = _best(group, free)
                kept[g] = True
                free[g] = False
            for j in range(e):
                allowed[j] = kept[j // size]
        total = F32(0.0)
        for slot in range(k):  # k passes of an argmax: k <= E is small, and ties go to the lower index
            j = _best(rank, allowed)
            allowed[j] = False
            ids[t, slot] = j
            weights[t, slot] = scores[j]
            total += scores[j]
        for slot in range(k):
            v = weights[t, slot] / total if renormalize else weights[t, slot]
            weights[t, slot] = v * scaling


def moe_route(outs, logits, bias, *, k, scoring, n_group, topk_group, renormalize, scaling):
    weights, ids = outs
    _route_kernel(raw_view(logits), raw_view(bias), scoring == "sigmoid", n_group or 0, topk_group or 0, bool(renormalize),
                  F32(scaling), weights, ids)


# ---------------------------------------------------------------- moe_align


@njit(cache=True)
def _align_kernel(ids, experts, block_m, sorted_ids, block_experts, offsets, total):
    """One counting pass, a padded prefix sum, one placing pass: O(T*k + E), sequential (T*k of a
    batch is tens of thousands; a parallel histogram would not pay for its threads)."""
    n = ids.shape[0]
    counts = np.zeros(experts, np.int64)
    for i in range(n):
        v = ids[i]
        if 0 <= v < experts:
            counts[v] += 1
    cursor = np.empty(experts, np.int64)
    start = 0
    for x in range(experts):
        offsets[x] = cursor[x] = start
        start += (counts[x] + block_m - 1) // block_m * block_m
    offsets[experts] = total[0] = start
    sorted_ids[:] = n  # padding and the unused tail hold the sentinel T*k
    for i in range(n):  # ascending i, so each expert's indices come out ascending
        v = ids[i]
        if 0 <= v < experts:
            sorted_ids[cursor[v]] = i
            cursor[v] += 1
    block_experts[:] = -1
    for x in range(experts):
        for b in range(offsets[x] // block_m, offsets[x + 1] // block_m):
            block_experts[b] = x


def moe_align(outs, topk_ids, *, num_experts, block_m):
    _align_kernel(topk_ids.reshape(-1), num_experts, block_m, *outs)


# ---------------------------------------------------------------- moe_permute / moe_unpermute


@njit(**KERNEL)
def _permute_kernel(x, sorted_ids, k, out):
    """Row r of out = x[sorted_ids[r] // k] (raw element copy), zeros for non-index entries."""
    n = x.shape[0] * k
    for r in prange(out.shape[0]):
        i = sorted_ids[r]
        if 0 <= i < n:
            out[r, :] = x[i // k, :]
        else:
            out[r, :] = 0


def moe_permute(outs, x, topk_ids, sorted_ids):
    (out,) = outs
    _permute_kernel(raw_view(x), sorted_ids, topk_ids.shape[1], raw_view(out))


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _add_scaled_row(weight, y, acc):
    for c in range(acc.shape[0]):
        acc[c] += weight * load(y, c)


@njit(**KERNEL)
def _unpermute_kernel(y, sorted_ids, weights, out):
    tokens, k = weights.shape
    n = tokens * k
    row_of = np.full(n, -1, np.int64)  # the row of y holding flat index t*k + j
    for r in range(sorted_ids.shape[0]):
        i = sorted_ids[r]
        if 0 <= i < n:
            row_of[i] = r
    for t in prange(tokens):
        acc = np.zeros(y.shape[1], np.float32)
        for j in range(k):  # slot order, float32 accumulation
            r = row_of[t * k + j]
            if r >= 0:
                _add_scaled_row(load(weights, (t, j)), y[r], acc)
        for c in range(acc.shape[0]):
            store(out, (t, c), acc[c])


def moe_unpermute(outs, y, sorted_ids, topk_weights):
    (out,) = outs
    _unpermute_kernel(raw_view(y), sorted_ids, raw_view(topk_weights), raw_view(out))


# ---------------------------------------------------------------- grouped_gemm
#
# bfloat16 on AMX takes gemm_core.amx_grouped (AMX tiles, W read in place), float32 on AVX-512 the
# panel kernel further down; the rest is this kernel.
# Each expert's product is a block of dot products out[r, n] = x[r, :] . w[e, n, :]: both operands
# keep K contiguous (nn.Linear layout), so a tile of _MR rows x _NR weight rows is computed straight
# from them, with no packing or widening pass over the weights (which are most of the bytes). The
# tile is hand-built LLVM IR (Numba cannot express vector accumulators): _MR x _NR accumulators of 16
# float32 lanes stay in registers across K, one 64-byte chunk of each row at a time, then a
# shuffle tree sums the lanes. bfloat16 uses AVX512-BF16's vdpbf16ps (32 products per instruction)
# where the host has it (unless HAL_CPU_GEMM=fma); otherwise a chunk is widened in registers (bfloat16
# by a shift, float16 by vcvtph2ps) and fed to FMAs, which is also the float32 path without AVX-512.

_HAS_BF16_DOT = "avx512bf16" in CPU_FEATURES
# Tile: with AVX-512, 6 x 4 accumulators + 6 row chunks of x + 1 of w = 31 of the 32 zmm registers
# (measured 4x6, 5x5, 8x3 within noise of it); a 16-lane vector is two ymm registers on AVX2,
# which has 16 of them, so a 3 x 2 tile there.
_MR, _NR = (6, 4) if "avx512f" in CPU_FEATURES else (3, 2)
_TASK_ROWS = 128  # weight rows per task: 128 x 4 KB K block = 512 KB of the 1 MB L2 beside the x block
_KC_BYTES = 4096  # bytes of a row per K block: 6 rows of x = 24 KB of the 48 KB L1 (measured: 2 KB 5% slower)


_I32, _I64, _FLT = ir.IntType(32), ir.IntType(64), ir.FloatType()
_V16F = ir.VectorType(_FLT, 16)


def _row_addresses(builder, base, first, valid, count, stride):
    """IR of the addresses base + (first + i) * stride of `count` rows, rows i >= valid repeating the last valid one."""
    last = builder.sub(valid, ir.Constant(_I64, 1))
    rows = [builder.select(builder.icmp_signed("<", ir.Constant(_I64, i), valid), ir.Constant(_I64, i), last)
            for i in range(count)]
    return [builder.add(base, builder.mul(builder.add(first, r), stride)) for r in rows]


@intrinsic(prefer_literal=True)
def _dot_tile(typingctx, x, m0, m_valid, w, expert, n0, n_valid, k0, k1, out, col, dot):
    """out[i, col + j] (+)= x[m0 + i, k0:k1] . w[expert, n0 + j, k0:k1] in float32 for i < _MR, j < _NR,
    adding to out when k0 > 0.

    x [R, K] and w [E, N, K] are raw arrays with K contiguous; the kind of tile follows their dtype.
    Rows past m_valid / n_valid repeat the last valid row (wasted lanes, no bounds checks in the loop);
    out is a float32 [_MR, >= col + _NR] buffer."""
    if not isinstance(dot, types.BooleanLiteral):
        return None
    bf16 = "bf16dot" if dot.literal_value and _HAS_BF16_DOT else "bf16"
    kind = {types.float32: "f32", types.uint16: "f16", types.int16: bf16}.get(x.dtype)
    if kind is None or w.dtype != x.dtype:
        return None
    sig = types.void(x, types.intp, types.intp, w, types.intp, types.intp, types.intp, types.intp, types.intp, out, types.intp, dot)

    def codegen(context, builder, sig, args):
        xa, m0, m_valid, wa, expert, n0, n_valid, k0, k1, outa, col, _ = args
        xarr = context.make_array(sig.args[0])(context, builder, xa)
        warr = context.make_array(sig.args[3])(context, builder, wa)
        oarr = context.make_array(sig.args[9])(context, builder, outa)
        x_stride = cgutils.unpack_tuple(builder, xarr.strides)[0]
        w_strides = cgutils.unpack_tuple(builder, warr.strides)
        k = builder.sub(k1, k0)
        item = ir.Constant(_I64, sig.args[0].dtype.bitwidth // 8)
        one = ir.Constant(_I64, 1)
        start = builder.mul(k0, item)
        xrows = _row_addresses(builder, builder.add(builder.ptrtoint(xarr.data, _I64), start), m0, m_valid, _MR, x_stride)
        wbase = builder.add(builder.ptrtoint(warr.data, _I64), builder.add(builder.mul(expert, w_strides[0]), start))
        wrows = _row_addresses(builder, wbase, n0, n_valid, _NR, w_strides[1])
        chunks = Chunks(builder, kind)

        def step(accs, offset, mask=None):
            """One chunk of every row at byte offset: _MR x _NR accumulations."""
            xs = [chunks.load(builder.add(a, offset), mask) for a in xrows]
            new = [[None] * _NR for _ in range(_MR)]
            for j, a in enumerate(wrows):
                wv = chunks.load(builder.add(a, offset), mask)
                for i in range(_MR):
                    new[i][j] = chunks.accumulate(accs[i][j], xs[i], wv)
            return new

        def merge(block, incoming):
            """Phi nodes joining accumulator sets [(accs, predecessor block)]."""
            phis = [[builder.phi(_V16F) for _ in range(_NR)] for _ in range(_MR)]
            for accs, pred in incoming:
                for i in range(_MR):
                    for j in range(_NR):
                        phis[i][j].add_incoming(accs[i][j], pred)
            return phis

        zero = [[ir.Constant(_V16F, None)] * _NR for _ in range(_MR)]
        lanes = ir.Constant(_I64, chunks.lanes)
        full, rest = builder.udiv(k, lanes), builder.urem(k, lanes)
        entry = builder.block
        loop, after = builder.append_basic_block("tile.loop"), builder.append_basic_block("tile.after")
        builder.cbranch(builder.icmp_unsigned(">", full, ir.Constant(_I64, 0)), loop, after)

        builder.position_at_end(loop)  # full chunks
        index = builder.phi(_I64)
        accs = merge(loop, [(zero, entry)])
        looped = step(accs, builder.mul(index, ir.Constant(_I64, chunks.bytes)))
        following = builder.add(index, one)
        index.add_incoming(ir.Constant(_I64, 0), entry)
        index.add_incoming(following, loop)
        for i in range(_MR):
            for j in range(_NR):
                accs[i][j].add_incoming(looped[i][j], loop)
        builder.cbranch(builder.icmp_unsigned("<", following, full), loop, after)

        builder.position_at_end(after)  # the K % lanes tail: one masked chunk
        accs = merge(after, [(zero, entry), (looped, loop)])
        tail, done = builder.append_basic_block("tile.tail"), builder.append_basic_block("tile.done")
        builder.cbranch(builder.icmp_unsigned(">", rest, ir.Constant(_I64, 0)), tail, done)
        builder.position_at_end(tail)
        lane_ids = ir.Constant(ir.VectorType(_I64, chunks.lanes), list(range(chunks.lanes)))
        splat = builder.insert_element(ir.Constant(ir.VectorType(_I64, chunks.lanes), None), rest, ir.Constant(_I32, 0))
        splat = builder.shuffle_vector(splat, splat, ir.Constant(ir.VectorType(_I32, chunks.lanes), [0] * chunks.lanes))
        tailed = step(accs, builder.mul(full, ir.Constant(_I64, chunks.bytes)), builder.icmp_unsigned("<", lane_ids, splat))
        builder.branch(done)

        builder.position_at_end(done)
        final = merge(done, [(accs, after), (tailed, tail)])
        sums = lane_sums(builder, [final[i][j] for i in range(_MR) for j in range(_NR)])
        out_row = cgutils.unpack_tuple(builder, oarr.strides)[0]
        out_base = builder.add(builder.ptrtoint(oarr.data, _I64), builder.mul(col, ir.Constant(_I64, 4)))
        quad = ir.VectorType(_FLT, _NR)
        adding = builder.icmp_signed(">", k0, ir.Constant(_I64, 0))
        for i in range(_MR):  # row i of the tile: lanes i*_NR .. i*_NR + _NR - 1 of the packed sums
            first = i * _NR
            low = sums[first // 16]
            high = sums[min(first // 16 + 1, len(sums) - 1)]  # a row may continue in the next vector
            piece = builder.shuffle_vector(low, high, ir.Constant(ir.VectorType(_I32, _NR), [first % 16 + j for j in range(_NR)]))
            pointer = builder.inttoptr(builder.add(out_base, builder.mul(ir.Constant(_I64, i), out_row)), quad.as_pointer())
            with builder.if_then(adding):  # a later K block: add to the earlier blocks' sums
                builder.store(builder.fadd(piece, builder.load(pointer, align=4)), pointer, align=4)
            with builder.if_then(builder.not_(adding)):
                builder.store(piece, pointer, align=4)

    return sig, codegen


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _store_row(acc, out, act):
    """out = act(acc[:width]), acc the task's float32 sums (activated in place)."""
    activate_row(acc, out.shape[0], act)
    for j in range(out.shape[0]):
        store(out, j, acc[j])


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _store_gated_row(gate, up, out, act):
    """out = act(gate) * up, gate and up the task's float32 sums (gate activated in place)."""
    activate_row(gate, out.shape[0], act)
    for j in range(out.shape[0]):
        store(out, j, gate[j] * up[j])


@njit(**HELPER)
def _tile(x, m0, m_valid, w, expert, n0, n_valid, k0, k1, out, col, dot):
    """_dot_tile on bfloat16 with vdpbf16ps where the host has it, or (dot False: the forced fma rung)
    widening; a run-time choice, so one cached kernel serves both."""
    if dot:
        _dot_tile(x, m0, m_valid, w, expert, n0, n_valid, k0, k1, out, col, True)
    else:
        _dot_tile(x, m0, m_valid, w, expert, n0, n_valid, k0, k1, out, col, False)


@njit(**KERNEL)
def _grouped_kernel(x, w, starts, ends, tasks, n, act, gated, out, dot):
    """tasks[t] = (expert, first column): the output columns of one expert over all its rows
    [starts[e], ends[e]) into a float32 block, then a vectorized epilogue over its rows. K is taken in
    blocks of _KC_BYTES (outermost, so one block's slices of the expert's x rows and the task's weight
    rows stay in L2), _MR rows of x at a time (in L1 while the weight rows stream by)."""
    k = x.shape[1]
    kc = _KC_BYTES // x.itemsize
    nb = _TASK_ROWS // 2 if gated else _TASK_ROWS  # output columns per task
    for t in prange(tasks.shape[0]):
        e, j0 = tasks[t, 0], tasks[t, 1]
        lo, hi = starts[e], ends[e]
        width = min(nb, n - j0)
        # float32 sums of the task's block; + _MR rows, + _NR columns: the last tiles may reach past it
        gate = np.empty((hi - lo + _MR, nb + _NR), np.float32)
        up = np.empty((hi - lo + _MR, nb + _NR), np.float32) if gated else gate
        for k0 in range(0, max(k, 1), kc):  # K = 0 still runs once: the tile writes zeros
            k1 = min(k0 + kc, k)
            for m0 in range(lo, hi, _MR):
                mv = min(_MR, hi - m0)
                for j in range(0, width, _NR):
                    _tile(x, m0, mv, w, e, j0 + j, min(_NR, width - j), k0, k1, gate[m0 - lo:], j, dot)
                if gated:  # the up half's rows sit n below the gate's
                    for j in range(0, width, _NR):
                        _tile(x, m0, mv, w, e, n + j0 + j, min(_NR, width - j), k0, k1, up[m0 - lo:], j, dot)
        for r in range(lo, hi):
            if gated:
                _store_gated_row(gate[r - lo], up[r - lo], out[r, j0:j0 + width], act)
            else:
                _store_row(gate[r - lo], out[r, j0:j0 + width], act)


# float32 on AVX-512 takes a broadcast kernel, the shape of an sgemm microkernel: the dot-product tile
# above loads 10 vectors per 24 FMAs and ends each K block with a shuffle tree, and ran at 0.55-0.8x of
# torch's per-expert sgemm per core (87-108 against 125-160 GFLOP/s, K = N = 2048 gated). Here each
# expert's rows are first packed transposed into panels of _PANEL rows (panel[k, i] = x[row i, k],
# zeros past the expert's end: 1/N of the product's work), and a tile is _WROWS weight rows x up to
# _PANEL x rows: per k, _WROWS broadcasts of w[n, k] read in place times 3 vectors of the panel into 18
# accumulators, no horizontal sums (8 rows: 24 accumulators + 8 broadcasts + 3 vectors spilled).
_PANEL, _WROWS = 48, 6
_PANEL_KC = 512  # k per tile call: the 6 weight rows' 12 KB stay in L1 across the block's panels
_PANEL_MC = 3  # panels per row block: 3 x 48 rows x _PANEL_KC floats (288 KB) stay in L2 while w streams by
_PANEL_TASK = 512  # weight rows per task: each task reads its expert's x once (128 rows: 0.9x the speed)


@intrinsic(prefer_literal=True)
def _fma_tile(typingctx, w, expert, n0, n_valid, k0, k1, ahead, xp, panel, vecs, out, col):
    """out[i, col + c] (+)= sum over k0 <= k < k1 of w[expert, n0 + i, k] * xp[panel + _PANEL k + c] in float32,
    for i < _WROWS and c < 16 vecs, adding to out when k0 > 0.

    w [E, N, K] float32 with K contiguous, xp the packed panels (1-D), out a float32 [_WROWS, >= col + 16 vecs]
    buffer; weight rows past n_valid repeat the last valid one. The loop takes k 16 at a time, unrolled (one
    line of each weight row), and prefetches that line of the next tile's weights (_WROWS rows from byte
    `ahead` of w[expert]); the k1 - k0 % 16 rest one k at a time. Unrolled, with no per-k prefetch arithmetic,
    it ran 1.2x the one-k loop per core (147 against 120 GFLOP/s, 16 experts of the bench, K = N = 2048 gated)."""
    if not isinstance(vecs, types.IntegerLiteral) or w.dtype != types.float32:
        return None
    nv = vecs.literal_value
    sig = types.void(w, types.intp, types.intp, types.intp, types.intp, types.intp, types.intp, xp, types.intp, vecs, out, types.intp)

    def codegen(context, builder, sig, args):
        wa, expert, n0, n_valid, k0, k1, ahead, xpa, panel, _, outa, col = args
        warr = context.make_array(sig.args[0])(context, builder, wa)
        xarr = context.make_array(sig.args[7])(context, builder, xpa)
        oarr = context.make_array(sig.args[10])(context, builder, outa)
        w_strides = cgutils.unpack_tuple(builder, warr.strides)
        const = lambda v: ir.Constant(_I64, v)
        wbase = builder.add(builder.ptrtoint(warr.data, _I64), builder.add(builder.mul(expert, w_strides[0]), builder.mul(k0, const(4))))
        wrows = _row_addresses(builder, wbase, n0, n_valid, _WROWS, w_strides[1])
        xbase = builder.add(builder.ptrtoint(xarr.data, _I64), builder.mul(builder.add(panel, builder.mul(k0, const(_PANEL))), const(4)))
        fma = builder.module.declare_intrinsic("llvm.fma.v16f32", fnty=ir.FunctionType(_V16F, [_V16F, _V16F, _V16F]))
        prefetch = builder.module.declare_intrinsic("llvm.prefetch.p0", fnty=ir.FunctionType(ir.VoidType(), [ir.PointerType(), _I32, _I32, _I32]))
        ahead = builder.add(builder.ptrtoint(warr.data, _I64), builder.add(builder.mul(expert, w_strides[0]), ahead))
        zero, splat = ir.Constant(_V16F, None), ir.Constant(ir.VectorType(_I32, 16), [0] * 16)
        count = builder.sub(k1, k0)

        def step(accs, kk):
            """One k: _WROWS broadcasts x nv vectors of the panel's row k."""
            row = builder.add(xbase, builder.mul(kk, const(_PANEL * 4)))
            xs = [builder.load(builder.inttoptr(builder.add(row, const(64 * j)), _V16F.as_pointer()), align=4) for j in range(nv)]
            new = []
            for i, a in enumerate(wrows):
                scalar = builder.load(builder.inttoptr(builder.add(a, builder.mul(kk, const(4))), _FLT.as_pointer()), align=4)
                b = builder.shuffle_vector(builder.insert_element(zero, scalar, ir.Constant(_I32, 0)), zero, splat)
                new.append([builder.call(fma, [b, xs[j], accs[i][j]]) for j in range(nv)])
            return new

        def line(accs, kk):
            """16 k (a 64-byte line of each weight row), then a prefetch of that line of the next tile's rows."""
            for u in range(16):
                accs = step(accs, builder.add(kk, const(u)))
            at = builder.add(ahead, builder.mul(kk, const(4)))
            for i in range(_WROWS):
                builder.call(prefetch, [builder.inttoptr(builder.add(at, builder.mul(const(i), w_strides[1])), ir.PointerType()),
                                        ir.Constant(_I32, 0), ir.Constant(_I32, 3), ir.Constant(_I32, 1)])
            return accs

        def loop(accs, start, stop, stride, body):
            """The accumulators after `for kk in range(start, stop, stride): accs = body(accs, kk)`."""
            before = builder.block
            block, after = builder.append_basic_block("fma.loop"), builder.append_basic_block("fma.after")
            builder.cbranch(builder.icmp_signed("<", start, stop), block, after)
            builder.position_at_end(block)
            index = builder.phi(_I64)
            phis = [[builder.phi(_V16F) for _ in range(nv)] for _ in range(_WROWS)]
            new = body(phis, index)
            following = builder.add(index, const(stride))
            end = builder.block
            index.add_incoming(start, before)
            index.add_incoming(following, end)
            builder.cbranch(builder.icmp_signed("<", following, stop), block, after)
            builder.position_at_end(after)
            joined = [[builder.phi(_V16F) for _ in range(nv)] for _ in range(_WROWS)]
            for i in range(_WROWS):
                for j in range(nv):
                    for phi in (phis[i][j], joined[i][j]):
                        phi.add_incoming(accs[i][j], before)
                        phi.add_incoming(new[i][j], end)
            return joined

        lines = builder.mul(builder.sdiv(count, const(16)), const(16))
        final = loop(loop([[zero] * nv for _ in range(_WROWS)], const(0), lines, 16, line), lines, count, 1, step)
        out_row = cgutils.unpack_tuple(builder, oarr.strides)[0]
        out_base = builder.add(builder.ptrtoint(oarr.data, _I64), builder.mul(col, const(4)))
        pointers = [[builder.inttoptr(builder.add(out_base, builder.add(builder.mul(const(i), out_row), const(64 * j))), _V16F.as_pointer())
                     for j in range(nv)] for i in range(_WROWS)]
        with builder.if_else(builder.icmp_signed(">", k0, const(0))) as (adding, first):
            with adding:  # a later K block: add to the earlier blocks' sums
                for i in range(_WROWS):
                    for j in range(nv):
                        builder.store(builder.fadd(final[i][j], builder.load(pointers[i][j], align=4)), pointers[i][j], align=4)
            with first:
                for i in range(_WROWS):
                    for j in range(nv):
                        builder.store(final[i][j], pointers[i][j], align=4)

    return sig, codegen


@njit(**HELPER)
def _fma_tiles(w, expert, n0, n_valid, k0, k1, ahead, xp, panel, rows, out, col):
    """_fma_tile over the vectors a panel's `rows` valid rows fill (a tail panel skips its zero vectors)."""
    if rows > 32:
        _fma_tile(w, expert, n0, n_valid, k0, k1, ahead, xp, panel, 3, out, col)
    elif rows > 16:
        _fma_tile(w, expert, n0, n_valid, k0, k1, ahead, xp, panel, 2, out, col)
    else:
        _fma_tile(w, expert, n0, n_valid, k0, k1, ahead, xp, panel, 1, out, col)


@njit(**KERNEL)
def _pack_panels(x, first_row, valid, xp):
    """Panel t of xp = x[first_row[t] + i, k] at [k, i] for i < valid[t], zeros for the rest of its _PANEL rows."""
    k = x.shape[1]
    for t in prange(first_row.shape[0]):
        panel = xp[t * k * _PANEL:(t + 1) * k * _PANEL].reshape(k, _PANEL)
        rows = x[first_row[t]:first_row[t] + valid[t]]
        for kk in range(k):
            for i in range(valid[t]):
                panel[kk, i] = rows[i, kk]
            panel[kk, valid[t]:] = 0


@njit(**KERNEL)
def _panel_kernel(w, xp, starts, ends, first, tasks, n, act, gated, out):
    """tasks[t] = (expert, first column) of _PANEL_TASK weight rows, over the expert's packed panels (its first
    is panel first[e] of xp): per block of _PANEL_MC panels (in L2), K in blocks of _PANEL_KC, each _WROWS
    weight rows (in L1) against the block's panels, the next rows prefetched during the last panel (during the
    first: 3% slower per core, the panels streaming through L1 in between); then the block's epilogue. The
    float32 sums are kept transposed (weight row, x row), so the epilogue gathers an output row from a column."""
    k = w.shape[2]
    nb = _PANEL_TASK // 2 if gated else _PANEL_TASK
    rows = _PANEL_MC * _PANEL
    for t in prange(tasks.shape[0]):
        e, j0 = tasks[t, 0], tasks[t, 1]
        lo, hi = starts[e], ends[e]
        width = min(nb, n - j0)
        gate = np.empty((nb + _WROWS, rows), np.float32)  # + _WROWS: the last tile may reach past width
        up = np.empty((nb + _WROWS, rows), np.float32) if gated else gate
        g = np.empty(width, np.float32)
        u = np.empty(width, np.float32)
        for m0 in range(lo, hi, rows):
            p0 = (m0 - lo) // _PANEL
            for k0 in range(0, max(k, 1), _PANEL_KC):  # K = 0 still runs once: the tile writes zeros
                k1 = min(k0 + _PANEL_KC, k)
                for half in range(2 if gated else 1):  # the up half's weight rows sit n below the gate's
                    sums = up if half else gate
                    for i in range(0, width, _WROWS):
                        row = half * n + j0 + i
                        last = min(p0 + _PANEL_MC, (hi - lo + _PANEL - 1) // _PANEL) - 1
                        for p in range(p0, last + 1):  # the last panel prefetches the next weight rows (the others: their own, in L1)
                            ahead = (row + _WROWS if p == last else row) * w.strides[1] + k0 * 4
                            _fma_tiles(w, e, row, min(_WROWS, width - i), k0, k1, ahead, xp, (first[e] + p) * k * _PANEL,
                                       hi - lo - p * _PANEL, sums[i:], (p - p0) * _PANEL)
            for r in range(m0, min(m0 + rows, hi)):
                g[:] = gate[:width, r - m0]
                if gated:
                    u[:] = up[:width, r - m0]
                    _store_gated_row(g, u, out[r, j0:j0 + width], act)
                else:
                    _store_row(g, out[r, j0:j0 + width], act)


def _tasks(starts, ends, n, nb):
    """(expert, first column) of every block of nb output columns of every expert with rows. Their costs
    follow the experts' rows (1 to 562 in the bench), so the kernels take them with parallel_chunksize(1):
    Numba's default hands each thread an equal count of consecutive tasks (on 2 threads: one busy, one idle
    most of a call)."""
    experts = np.flatnonzero(ends > starts)
    blocks = -(-n // nb)
    return np.stack([np.repeat(experts, blocks), np.tile(np.arange(blocks) * nb, experts.size)], axis=1)


def _panels(x, w, starts, ends, act, gated, out):
    """The float32 product: pack each expert's rows into panels, then _panel_kernel."""
    counts = -(-(ends - starts) // _PANEL)
    first = np.cumsum(counts) - counts
    owner = np.repeat(np.arange(counts.size), counts)
    first_row = starts[owner] + (np.arange(owner.size) - first[owner]) * _PANEL
    xp = np.empty(owner.size * x.shape[1] * _PANEL, np.float32)
    _pack_panels(x, first_row, np.minimum(_PANEL, ends[owner] - first_row), xp)
    n = out.shape[1]
    with parallel_chunksize(1):  # one task at a time (_tasks)
        _panel_kernel(w, xp, starts, ends, first, _tasks(starts, ends, n, _PANEL_TASK // 2 if gated else _PANEL_TASK), n, act, gated, out)


def _unaliased(x):
    """x itself, or a copy whose rows start 64 bytes apart from a multiple of 4 KB when x's rows are
    4 KB multiples long (K = 2048 in bfloat16): the 6 x rows and 4 weight rows of a tile then fall in
    different sets of the 12-way L1 instead of one set (measured: +12% for the gate/up product).
    The copy costs one pass over x, ~1% of the product."""
    if x.shape[1] * x.itemsize % 4096:
        return x
    padded = np.empty((x.shape[0], x.shape[1] + 64 // x.itemsize), x.dtype)
    view = padded[:, :x.shape[1]]
    view[...] = x
    return view


def _grouped_rows(x, w, starts, ends, activation, out):
    """out[starts[e]:ends[e]] = act(x[those rows] @ w[e].T) (or the gated act(gate) * up) for every expert e,
    zeros in the rows no expert owns; x [R, K], w [E, Nw, K], out [R, N] (raw views), starts / ends int64 [E]
    of disjoint segments: the contiguous and the masked layout alike (ops/moe.py)."""
    n = out.shape[1]
    out[outside_segments(out.shape[0], starts, ends)] = 0
    act, gated = activation_code(activation)
    if x.dtype == np.int16 and gemm_core.RUNG == "amx":  # bfloat16
        gemm_core.amx_grouped(x, w, starts, ends, act, gated, out)
        return
    if x.dtype == np.float32 and "avx512f" in CPU_FEATURES:
        _panels(x, w, starts, ends, act, gated, out)
        return
    tasks = _tasks(starts, ends, n, _TASK_ROWS // 2 if gated else _TASK_ROWS)
    with parallel_chunksize(1):
        _grouped_kernel(_unaliased(x), w, starts, ends, tasks, n, act, gated, out, gemm_core.RUNG != "fma")


def grouped_gemm(outs, x_sorted, w, expert_offsets, *, activation):
    """Per expert, out[rows] = act(x_sorted[rows] @ w[e].T) (or the gated act(gate) * up); zeros outside every segment."""
    bounds = expert_offsets.astype(np.int64)
    _grouped_rows(raw_view(x_sorted), raw_view(w), bounds[:-1], bounds[1:], activation, raw_view(outs[0]))


def grouped_gemm_masked(outs, x, w, masked_m, *, activation):
    """The masked layout as E * M rows: expert e's are [e M, e M + clamp(masked_m[e], 0, M))."""
    e, m, k = x.shape
    starts = np.arange(e, dtype=np.int64) * m
    ends = starts + masked_counts(masked_m, m)
    _grouped_rows(as_rows(x, k), raw_view(w), starts, ends, activation, as_rows(outs[0], outs[0].shape[2]))


KERNELS = (
    Kernel("moe_route", moe_route),
    Kernel("moe_align", moe_align, INTS),
    # Row gathers take any strides of x: no contiguous copy of the activations first.
    Kernel("moe_permute", moe_permute, options={"contiguous": False}),
    Kernel("moe_unpermute", moe_unpermute),
    Kernel("grouped_gemm", grouped_gemm),
    Kernel("grouped_gemm_masked", grouped_gemm_masked),
)
