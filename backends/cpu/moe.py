"""CPU kernels: MoE routing, the expert-sorted token layout, and grouped GEMM (see ops/moe.py).

Routing, the align pass and the permutes are Numba loops. grouped_gemm and grouped_gemm_masked (the
same kernel over their experts' row segments) are one parallel Numba kernel over (expert, block of
output columns) tasks whose inner tile is LLVM IR built here: it reads
float16 / bfloat16 in their own format (AVX512-BF16 dot products where the host has them), so no
operand is widened or packed in memory first, and the activation (plain or gated, hal.codes) is fused
into the epilogue.
"""
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from hal.codes import activation_code
from hal.dtypes import INTS
from hal.ops.moe import masked_counts

from . import gemm_core
from .common import CPU_FEATURES, F32, FASTMATH, HELPER, KERNEL, Kernel, activate_row, as_rows, exp, f32_bits, load, outside_segments, raw_view, store

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
# bfloat16 on AMX takes gemm_core.amx_grouped (AMX tiles, W read in place); the rest is this kernel.
# Each expert's product is a block of dot products out[r, n] = x[r, :] . w[e, n, :]: both operands
# keep K contiguous (nn.Linear layout), so a tile of _MR rows x _NR weight rows is computed straight
# from them, with no packing or widening pass over the weights (which are most of the bytes). The
# tile is hand-built LLVM IR (Numba cannot express vector accumulators): _MR x _NR accumulators of 16
# float32 lanes stay in registers across K, one 64-byte chunk of each row at a time, then a
# shuffle tree sums the lanes. bfloat16 uses AVX512-BF16's vdpbf16ps (32 products per instruction)
# where the host has it (unless HAL_CPU_GEMM=fma); otherwise a chunk is widened in registers (bfloat16
# by a shift, float16 by vcvtph2ps) and fed to FMAs, which is also the float32 path.

_HAS_BF16_DOT = "avx512bf16" in CPU_FEATURES
# Tile: with AVX-512, 6 x 4 accumulators + 6 row chunks of x + 1 of w = 31 of the 32 zmm registers
# (measured 4x6, 5x5, 8x3 within noise of it); a 16-lane vector is two ymm registers on AVX2,
# which has 16 of them, so a 3 x 2 tile there.
_MR, _NR = (6, 4) if "avx512f" in CPU_FEATURES else (3, 2)
_TASK_ROWS = 128  # weight rows per task: 128 x 4 KB K block = 512 KB of the 1 MB L2 beside the x block
_KC_BYTES = 4096  # bytes of a row per K block: 6 rows of x = 24 KB of the 48 KB L1 (measured: 2 KB 5% slower)


class _BFloat(ir.Type):
    """LLVM's bfloat type, which llvmlite does not provide (vdpbf16ps takes <32 x bfloat>)."""

    def _to_string(self):
        return "bfloat"

    def __eq__(self, other):
        return isinstance(other, _BFloat)

    def __hash__(self):
        return hash("bfloat")


_I1, _I32, _I64, _FLT = ir.IntType(1), ir.IntType(32), ir.IntType(64), ir.FloatType()
_V16F = ir.VectorType(_FLT, 16)


class _Chunks:
    """How one kind of row is read 64 bytes (or 32 for widened 16-bit) at a time and accumulated."""

    def __init__(self, builder, kind):
        self.builder, self.kind = builder, kind
        module = builder.module
        bits = 32 if kind == "f32" else 16
        self.lanes = 32 if kind == "bf16dot" else 16  # elements per chunk
        self.raw = ir.VectorType(ir.IntType(bits), self.lanes)
        self.bytes = self.lanes * bits // 8
        self.masked_load = module.declare_intrinsic(
            f"llvm.masked.load.v{self.lanes}i{bits}.p0",
            fnty=ir.FunctionType(self.raw, [ir.PointerType(), _I32, ir.VectorType(_I1, self.lanes), self.raw]))
        if kind == "bf16dot":
            self.dot = module.declare_intrinsic(
                "llvm.x86.avx512bf16.dpbf16ps.512",
                fnty=ir.FunctionType(_V16F, [_V16F, ir.VectorType(_BFloat(), 32), ir.VectorType(_BFloat(), 32)]))
        else:
            self.fma = module.declare_intrinsic("llvm.fma.v16f32", fnty=ir.FunctionType(_V16F, [_V16F, _V16F, _V16F]))

    def load(self, address, mask=None):
        """The chunk at an integer address, as the operand accumulate() takes (masked lanes read 0)."""
        b = self.builder
        if mask is None:
            v = b.load(b.inttoptr(address, self.raw.as_pointer()), align=2)
        else:
            v = b.call(self.masked_load, [b.inttoptr(address, ir.PointerType()), ir.Constant(_I32, 2), mask,
                                          ir.Constant(self.raw, None)])
        if self.kind == "bf16dot":
            return b.bitcast(v, ir.VectorType(_BFloat(), 32))
        if self.kind == "bf16":  # bfloat16 is the top half of a float32
            return b.bitcast(b.shl(b.zext(v, ir.VectorType(_I32, 16)), ir.Constant(ir.VectorType(_I32, 16), [16] * 16)), _V16F)
        if self.kind == "f16":
            return b.fpext(b.bitcast(v, ir.VectorType(ir.HalfType(), 16)), _V16F)
        return b.bitcast(v, _V16F)

    def accumulate(self, acc, x, w):
        if self.kind == "bf16dot":
            return self.builder.call(self.dot, [acc, x, w])
        return self.builder.call(self.fma, [x, w, acc])


def _lane_sums(builder, vectors):
    """The horizontal sums of 16-lane vectors, packed 16 to a vector: lane i of result v holds the
    sum of vectors[16 * v + i].

    A shuffle tree: each round pairs two vectors whose lanes hold runs of partial sums, and one add
    of two two-source shuffles halves every run; 24 sums take ~70 instructions instead of ~200 for
    one reduction each."""
    items = list(vectors)
    run = 16  # lanes per partial sum
    while run > 1:
        if len(items) % 2:
            items.append(ir.Constant(_V16F, None))
        half, groups = run // 2, 16 // run
        lo = [base + g * run + t for base in (0, 16) for g in range(groups) for t in range(half)]
        hi = [i + half for i in lo]
        pick = lambda a, b, lanes: builder.shuffle_vector(a, b, ir.Constant(ir.VectorType(_I32, 16), lanes))
        items = [builder.fadd(pick(a, b, lo), pick(a, b, hi)) for a, b in zip(items[0::2], items[1::2])]
        run = half
    return items


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

        def row_addresses(base, first, valid, count, stride):
            last = builder.sub(valid, one)
            rows = [builder.select(builder.icmp_signed("<", ir.Constant(_I64, i), valid), ir.Constant(_I64, i), last)
                    for i in range(count)]
            return [builder.add(base, builder.mul(builder.add(first, r), stride)) for r in rows]

        start = builder.mul(k0, item)
        xrows = row_addresses(builder.add(builder.ptrtoint(xarr.data, _I64), start), m0, m_valid, _MR, x_stride)
        wbase = builder.add(builder.ptrtoint(warr.data, _I64), builder.add(builder.mul(expert, w_strides[0]), start))
        wrows = row_addresses(wbase, n0, n_valid, _NR, w_strides[1])
        chunks = _Chunks(builder, kind)

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
        sums = _lane_sums(builder, [final[i][j] for i in range(_MR) for j in range(_NR)])
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
    nb = _TASK_ROWS // 2 if gated else _TASK_ROWS
    experts = np.flatnonzero(ends > starts)
    blocks = -(-n // nb)
    tasks = np.stack([np.repeat(experts, blocks), np.tile(np.arange(blocks) * nb, experts.size)], axis=1)
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
