"""CPU attention kernels: attention (prefill, dense or varlen), paged_decode_attention, mla_decode.

All three are FlashAttention-style: a task owns a tile of query rows, walks the visible keys in
tiles and keeps a running max, running sum and float32 output accumulator per row (the online
softmax), so the seq_q x seq_k score matrix never exists. Everything is computed in float32.

The two matrix products per key tile run in a register-blocked microkernel written directly in
LLVM IR (`_microkernel`): Numba's loop vectorizer alone keeps the accumulators in memory and
reaches about a third of the FMA peak, while an _MR x _NR block of 16-lane accumulators held in
AVX-512 registers reaches ~70% of it (faster than OpenBLAS's AVX2 kernels on this CPU, and no
BLAS threads to fight with prange). The products are laid out transposed, with query rows as the
contiguous (vector) dimension:
    S^T [keys, rows] = K [keys, d] . Q^T [d, rows]        (A = the K tile, B = the scaled Q^T)
    O^T [dv, rows]  += V^T [dv, keys] . P^T [keys, rows]  (A = the V tile read column-wise)
so K and V are only widened to float32 row by row, never transposed, and the softmax of each
query row is a column of S^T: its max, exp and sum vectorize across the rows.

Decode has one query row per head, too few for that layout: a paged_decode_attention task owns a
partition of one sequence (split-K over long contexts, merged afterwards) for all heads, and per
KV head multiplies its group of query heads (padded to 4) with 4 keys at a time in `_dots`, then
P V in a 4 x 64 instance of the microkernel.
"""
import math

import ml_dtypes
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .common import (F16_TO_F32, F32, FASTMATH, HAS_F16C, HELPER, KERNEL, Kernel, U32, exp, f16_f32, f32_bits, load, raw_view,
                     store)

# ---------------------------------------------------------------- register-blocked microkernel

_LANES = 16  # float32 lanes of an AVX-512 register
_MR, _NR = 6, 64  # C block: 6 x 4 registers = 24 accumulators + 4 B vectors + 1 broadcast of 32


def _microkernel(mr, nr):
    """C[mr, nr] (+)= A[mr, k] . B[k, nr] on float32 arrays given as (array, element offset, strides).

    A[i, p] is a[a_off + i * a_rs + p * a_cs] (broadcast one scalar at a time, any layout);
    B[p, :] is the nr contiguous floats at b[b_off + p * ldb]; C[i, :] at c[c_off + i * ldc].
    The mr * nr / 16 accumulators are stack slots that LLVM promotes to registers."""
    nv = nr // _LANES

    @intrinsic
    def mk(typingctx, a, a_off, a_rs, a_cs, b, b_off, ldb, c, c_off, ldc, k, accumulate):
        sig = types.void(a, a_off, a_rs, a_cs, b, b_off, ldb, c, c_off, ldc, k, accumulate)

        def codegen(context, builder, sig, args):
            f32, i64 = ir.FloatType(), ir.IntType(64)
            vec = ir.VectorType(f32, _LANES)
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]), "llvm.fma.v16f32")
            data = [context.make_array(sig.args[i])(context, builder, args[i]).data for i in (0, 4, 7)]
            a_off, a_rs, a_cs, b_off, ldb, c_off, ldc, kk = (
                context.cast(builder, args[i], sig.args[i], types.int64) for i in (1, 2, 3, 5, 6, 8, 9, 10))
            pa, pb, pc = builder.gep(data[0], [a_off]), builder.gep(data[1], [b_off]), builder.gep(data[2], [c_off])

            def vptr(base, off):
                return builder.bitcast(builder.gep(base, [off]), vec.as_pointer())

            def c_ptr(i, v):
                return vptr(pc, builder.add(builder.mul(ir.Constant(i64, i), ldc), ir.Constant(i64, v * _LANES)))

            acc = [[cgutils.alloca_once(builder, vec) for _ in range(nv)] for _ in range(mr)]
            with builder.if_else(context.cast(builder, args[11], sig.args[11], types.boolean)) as (load_c, zero_c):
                with load_c:
                    for i in range(mr):
                        for v in range(nv):
                            builder.store(builder.load(c_ptr(i, v), align=4), acc[i][v])
                with zero_c:
                    for i in range(mr):
                        for v in range(nv):
                            builder.store(ir.Constant(vec, [0.0] * _LANES), acc[i][v])
            undef = ir.Constant(vec, ir.Undefined)
            lane0 = ir.Constant(ir.IntType(32), 0)
            splat_mask = ir.Constant(ir.VectorType(ir.IntType(32), _LANES), [0] * _LANES)
            with cgutils.for_range(builder, kk) as loop:
                p = loop.index
                brow = builder.mul(p, ldb)
                bv = [builder.load(vptr(pb, builder.add(brow, ir.Constant(i64, v * _LANES))), align=4) for v in range(nv)]
                acol = builder.mul(p, a_cs)
                for i in range(mr):
                    ai = builder.load(builder.gep(pa, [builder.add(builder.mul(ir.Constant(i64, i), a_rs), acol)]), align=4)
                    splat = builder.shuffle_vector(builder.insert_element(undef, ai, lane0), undef, splat_mask)
                    for v in range(nv):
                        builder.store(builder.call(fma, [splat, bv[v], builder.load(acc[i][v])]), acc[i][v])
            for i in range(mr):
                for v in range(nv):
                    builder.store(builder.load(acc[i][v]), c_ptr(i, v), align=4)
            return context.get_dummy_value()

        return sig, codegen

    return mk


_mk = _microkernel(_MR, _NR)


@intrinsic
def _dots(typingctx, a, a_off, lda, b, b_off, ldb, s, s_off, lds, k):
    """S[i, j] = A[i, :k] . B[j, :k] for i, j < 4 (k a multiple of 16) on float32 arrays: row i of A at
    a[a_off + i * lda], row j of B at b[b_off + j * ldb], S[i, j] to s[s_off + i * lds + j].

    Sixteen 16-lane accumulators, each loaded vector of A or B feeding four FMAs (one dot product at a
    time is bound by its two loads per FMA). The sixteen horizontal sums are one transposing tree:
    each stage adds the two halves of every pair of vectors' partial sums, so 15 adds and 30 shuffles
    leave the 16 dot products in the lanes of one vector (16 separate sums would take 64 of each)."""
    sig = types.void(a, a_off, lda, b, b_off, ldb, s, s_off, lds, k)

    def codegen(context, builder, sig, args):
        f32, i64 = ir.FloatType(), ir.IntType(64)
        vec = ir.VectorType(f32, _LANES)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]), "llvm.fma.v16f32")
        pa, pb, ps = (builder.gep(context.make_array(sig.args[i])(context, builder, args[i]).data,
                                  [context.cast(builder, args[i + 1], sig.args[i + 1], types.int64)]) for i in (0, 3, 6))
        lda, ldb, lds, kk = (context.cast(builder, args[i], sig.args[i], types.int64) for i in (2, 5, 8, 9))

        def vload(base, ld, row, p):
            ptr = builder.gep(base, [builder.add(builder.mul(ir.Constant(i64, row), ld), p)])
            return builder.load(builder.bitcast(ptr, vec.as_pointer()), align=4)

        acc = [cgutils.alloca_once_value(builder, ir.Constant(vec, [0.0] * _LANES)) for _ in range(16)]
        with cgutils.for_range_slice(builder, ir.Constant(i64, 0), kk, ir.Constant(i64, _LANES)) as (p, _):
            av = [vload(pa, lda, i, p) for i in range(4)]
            bv = [vload(pb, ldb, j, p) for j in range(4)]
            for i in range(4):
                for j in range(4):
                    builder.store(builder.call(fma, [av[i], bv[j], builder.load(acc[4 * i + j])]), acc[4 * i + j])
        sums = [builder.load(x) for x in acc]
        width = _LANES  # lanes of each accumulator's partial sums in the vectors of this stage
        while len(sums) > 1:
            half = width // 2
            chunks = range(0, _LANES, width)
            lo = [c + x for c in chunks for x in range(half)]
            hi = [c + half + x for c in chunks for x in range(half)]
            lo, hi = (ir.Constant(ir.VectorType(ir.IntType(32), _LANES), m + [_LANES + i for i in m]) for m in (lo, hi))
            sums = [builder.fadd(builder.shuffle_vector(x, y, lo), builder.shuffle_vector(x, y, hi))
                    for x, y in zip(sums[0::2], sums[1::2])]
            width = half
        quad = ir.VectorType(f32, 4)
        for i in range(4):
            row = builder.shuffle_vector(sums[0], sums[0], ir.Constant(ir.VectorType(ir.IntType(32), 4), list(range(4 * i, 4 * i + 4))))
            ptr = builder.gep(ps, [builder.mul(ir.Constant(i64, i), lds)])
            builder.store(row, builder.bitcast(ptr, quad.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _prefetch(typingctx, a, i):
    """Prefetch the cache line of a[i] (1-D array) into L2 (llvm.prefetch, read, locality 2)."""
    sig = types.void(a, i)

    def codegen(context, builder, sig, args):
        data = context.make_array(sig.args[0])(context, builder, args[0]).data
        i8p, i32 = ir.IntType(8).as_pointer(), ir.IntType(32)
        ptr = builder.bitcast(builder.gep(data, [context.cast(builder, args[1], sig.args[1], types.int64)]), i8p)
        fn = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32]), "llvm.prefetch.p0")
        builder.call(fn, [ptr, ir.Constant(i32, 0), ir.Constant(i32, 2), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _gemm(a, a_rs, a_cs, m, b, ldb, n, c, ldc, k, accumulate):
    """C[m, n] (+)= A[m, k] . B[k, n] with m a multiple of _MR and n of _NR (operands padded).
    Column panels outermost: the k x _NR panel of B stays in L1 while A streams past it."""
    for c0 in range(0, n, _NR):
        for r0 in range(0, m, _MR):
            _mk(a, r0 * a_rs, a_rs, a_cs, b, c0, ldb, c, r0 * ldc + c0, ldc, k, accumulate)


@njit(cache=True)
def _round_up(x, m):
    return -(-x // m) * m


# ---------------------------------------------------------------- online softmax on a tile

@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _softmax_tile(s, n, rows, lo, hi, j0, masked, softcap, m, l, alpha):
    """Turn scores S^T [n keys, rows] (keys j0.. of the sequence; the scale is already in q) into P^T
    in place and update the running max m and sum l of each row; alpha gets the factor rescaling
    the old accumulator. Row r sees keys [lo[r], hi[r]); `masked` is False when the whole tile is
    visible to all rows. Hidden keys are -inf after scaling, so any scale (0, negative, huge) works."""
    if softcap > 0:
        for j in range(n):
            for r in range(rows):
                s[j, r] = softcap * math.tanh(s[j, r] / softcap)
    if masked:
        for j in range(n):
            key = j0 + j
            for r in range(rows):
                s[j, r] = s[j, r] if lo[r] <= key < hi[r] else -np.inf
    new = m.copy()
    for j in range(n):
        for r in range(rows):
            new[r] = s[j, r] if s[j, r] > new[r] else new[r]
    for r in range(rows):
        # A row with nothing visible yet keeps m = -inf; exp(-inf - 0) = 0 gives it p = 0.
        alpha[r] = exp(m[r] - new[r]) if new[r] > -np.inf else F32(1.0)
        m[r] = new[r]
        new[r] = new[r] if new[r] > -np.inf else F32(0.0)
        l[r] *= alpha[r]
    for j in range(n):
        for r in range(rows):
            p = exp(s[j, r] - new[r])
            s[j, r] = p
            l[r] += p


@njit(cache=True)
def _tile_state(d, dvp, mp):
    """Per-task buffers of the online softmax: K and V tiles (keys x dims), scores, the transposed
    output accumulator, running max and sum of each query row, and the rescale factors."""
    return (np.zeros((_BN, d), np.float32), np.zeros((_BN, dvp), np.float32), np.empty((_BN, mp), np.float32),
            np.zeros((dvp, mp), np.float32), np.full(mp, -np.inf, np.float32), np.zeros(mp, np.float32), np.empty(mp, np.float32))


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _tile_step(qt, kt, vt, n, s, o, m, l, alpha, lo, hi, j0, masked, softcap):
    """One key tile of the online softmax: keys j0 .. j0 + n - 1 in kt [>= n, d] and
    vt [>= n, dvp] (float32) against the queries qt [d, mp]; updates O^T o [dvp, mp] and
    the running max m and sum l. s [>= n, mp] is scratch for S^T / P^T."""
    d, mp = qt.shape
    dvp = o.shape[0]
    _gemm(kt, d, 1, _round_up(n, _MR), qt, mp, mp, s, mp, d, False)
    _softmax_tile(s, n, mp, lo, hi, j0, masked, softcap, m, l, alpha)
    for c in range(dvp):
        for r in range(mp):
            o[c, r] *= alpha[r]
    if masked and not np.isfinite(vt[:n]).all():
        # A NaN / inf of V at a key some rows may not see: those rows leave it out rather than weigh it
        # by 0 (0 * inf is NaN), as the reference does. Only tiles on a mask's edge take this loop.
        for j in range(n):
            for r in range(mp):
                if lo[r] <= j0 + j < hi[r]:
                    for c in range(dvp):
                        o[c, r] += s[j, r] * vt[j, c]
    else:
        _gemm(vt, 1, dvp, dvp, s, mp, mp, o, mp, n, True)


# ---------------------------------------------------------------- attention (prefill)

_ROWS = 256  # query rows per task: (query heads sharing a KV head) x (queries), a multiple of _NR
_BN = 126  # keys per tile (a multiple of _MR); with the Q^T, S^T, K, V and O^T tiles ~0.5 MB: in L2


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _visible(pos, sk, causal, window):
    """[lo, hi) of the keys a query at key position pos sees (empty when lo >= hi)."""
    lo, hi = 0, sk
    if causal:
        hi = min(hi, pos + 1)
    if window > 0:
        lo = max(lo, pos - window + 1)
        if not causal:
            hi = min(hi, pos + window)
    return lo, hi


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _widen_rows(src, t0, h, n, dst):
    """dst[j, :w] = float32(src[t0 + j, h, :]) for j < n (w = src's last dim)."""
    for j in range(n):
        row = src[t0 + j, h]
        for p in range(row.shape[0]):
            dst[j, p] = load(row, p)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _prefetch_rows(src, t0, h, n):
    """Start loading src[t0 + j, h, :] for j < n. Consecutive rows of one head are a whole token
    (all heads) apart, usually on different pages, where hardware prefetchers stop: without
    this, widening a K or V tile waits on one memory latency per row."""
    for j in range(n):
        row = src[t0 + j, h]
        for i in range(0, row.shape[0], 64 // row.itemsize):
            _prefetch(row, i)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _attention_task(q, k, v, out, task, scale, causal, window, softcap):
    """One task: (q token of the sequence start, k token of the sequence start, seq_q, seq_k,
    KV head, first query head, query heads, first query, queries) of q [Tq, Hq, d],
    k [Tk, Hkv, d], v [Tk, Hkv, dv] into out [Tq, Hq, dv]."""
    qs0, ks0, sq, sk, kvh, h0, hn, i0, bm = task
    d, dv = q.shape[2], v.shape[2]
    dvp = _round_up(dv, _MR)
    rows = hn * bm
    mp = _round_up(rows, _NR)
    # Row r = (head h0 + r // bm, query i0 + r % bm); padding rows see no key.
    qt = np.zeros((d, mp), np.float32)
    lo = np.zeros(mp, np.int64)
    hi = np.zeros(mp, np.int64)
    for r in range(rows):
        qrow = q[qs0 + i0 + r % bm, h0 + r // bm]
        for p in range(d):
            qt[p, r] = load(qrow, p) * scale
        lo[r], hi[r] = _visible(i0 + r % bm + sk - sq, sk, causal, window)
    k_lo, k_hi = lo[:rows].min(), hi[:rows].max()
    all_lo, all_hi = lo[:rows].max(), hi[:rows].min()  # keys in [all_lo, all_hi) are seen by every row
    kt, vt, s, o, m, l, alpha = _tile_state(d, dvp, mp)
    for j0 in range(k_lo, k_hi, _BN):
        n = min(_BN, k_hi - j0)
        _widen_rows(k, ks0 + j0, kvh, n, kt)
        _widen_rows(v, ks0 + j0, kvh, n, vt)
        n_next = min(_BN, k_hi - j0 - n)  # the next tile loads while this one computes
        _prefetch_rows(k, ks0 + j0 + n, kvh, n_next)
        _prefetch_rows(v, ks0 + j0 + n, kvh, n_next)
        masked = j0 < all_lo or j0 + n > all_hi
        _tile_step(qt, kt, vt, n, s, o, m, l, alpha, lo, hi, j0, masked, softcap)
    for r in range(rows):
        total = l[r] if l[r] > 0 else F32(np.inf)  # no visible key: zeros
        orow = out[qs0 + i0 + r % bm, h0 + r // bm]
        for c in range(dv):
            store(orow, c, o[c, r] / total)


@njit(**KERNEL)
def _attention_kernel(q, k, v, out, tasks, bounds, scale, causal, window, softcap):
    """Thread w runs tasks[bounds[w]:bounds[w + 1]] (a static, cost-balanced split)."""
    for w in prange(bounds.shape[0] - 1):
        for t in range(bounds[w], bounds[w + 1]):
            _attention_task(q, k, v, out, tasks[t], scale, causal, window, softcap)


def _balance(costs):
    """(order, bounds): task indices grouped per thread, threads' total costs nearly equal.
    Tasks are dealt most expensive first in snake order (0, 1, .., W-1, W-1, .., 0, 0, ..)."""
    workers = numba.get_num_threads()
    rank = np.argsort(-np.asarray(costs), kind="stable")
    turn = np.arange(len(rank)) % (2 * workers)
    worker = np.where(turn < workers, turn, 2 * workers - 1 - turn)
    order = rank[np.argsort(worker, kind="stable")]
    bounds = np.searchsorted(worker[np.argsort(worker, kind="stable")], np.arange(workers + 1))
    return order, bounds.astype(np.int64)


def _attention_tasks(lens_q, lens_k, starts_q, starts_k, hq, hkv, causal, window):
    """(tasks, bounds) for _attention_kernel."""
    group = hq // hkv
    hn = min(group, _ROWS)
    bm = max(1, _ROWS // hn)
    tasks, costs = [], []
    for sq, sk, qs0, ks0 in zip(lens_q, lens_k, starts_q, starts_k):
        if sq == 0:
            continue
        i0 = np.arange(0, sq, bm)
        n = np.minimum(bm, sq - i0)
        # keys visible to the tile: from its first query's lo to its last query's hi
        first, last = i0 + sk - sq, i0 + n - 1 + sk - sq
        hi = np.minimum(sk, last + 1) if causal else np.minimum(sk, last + window) if window else np.full_like(i0, sk)
        lo = np.maximum(0, first - window + 1) if window else np.zeros_like(i0)
        keys = np.maximum(hi - lo, 0)
        for kvh in range(hkv):
            for h0 in range(kvh * group, (kvh + 1) * group, hn):
                cols = [np.full_like(i0, qs0), np.full_like(i0, ks0), np.full_like(i0, sq), np.full_like(i0, sk),
                        np.full_like(i0, kvh), np.full_like(i0, h0), np.full_like(i0, min(hn, (kvh + 1) * group - h0)), i0, n]
                tasks.append(np.stack(cols, axis=1))
                costs.append(n * (keys + 1))
    if not tasks:
        return None, None
    order, bounds = _balance(np.concatenate(costs))
    return np.ascontiguousarray(np.concatenate(tasks)[order], dtype=np.int64), bounds


def _default_scale(q):
    """1 / sqrt(d); with d = 0 every score is 0 whatever the scale."""
    return 1.0 / math.sqrt(max(q.shape[-1], 1))


def attention(outs, q, k, v, causal, scale, window, softcap, cu_seqlens_q, cu_seqlens_k):
    """softmax(q k^T * scale) v, dense [B, S, H, D] or varlen [T, H, D] with cu_seqlens."""
    (out,) = outs
    if out.size == 0:
        return
    scale = _default_scale(q) if scale is None else scale
    if cu_seqlens_q is None:
        b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
        lens_q, lens_k = [sq] * b, [sk] * b
        starts_q, starts_k = [i * sq for i in range(b)], [i * sk for i in range(b)]
        q, k, v, out = (x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:]) for x in (q, k, v, out))
    else:
        cq, ck = np.asarray(cu_seqlens_q, np.int64), np.asarray(cu_seqlens_k, np.int64)
        lens_q, lens_k, starts_q, starts_k = np.diff(cq), np.diff(ck), cq[:-1], ck[:-1]
    tasks, bounds = _attention_tasks(lens_q, lens_k, starts_q, starts_k, q.shape[1], k.shape[1], bool(causal), int(window or 0))
    if tasks is not None:
        _attention_kernel(raw_view(q), raw_view(k), raw_view(v), raw_view(out), tasks, bounds, F32(scale), bool(causal), int(window or 0),
                          F32(softcap or 0.0))


# ---------------------------------------------------------------- decode: fp8 caches, partitions, merge

_FP8_FN = np.dtype(ml_dtypes.float8_e4m3fn)
_FP8_FNUZ = np.dtype(ml_dtypes.float8_e4m3fnuz)


def _raw_kv(a):
    """raw_view, plus fp8 caches: e4m3fn as uint8 and e4m3fnuz as int8 (the integer type picks the format)."""
    if a.dtype == _FP8_FN:
        return a.view(np.uint8)
    if a.dtype == _FP8_FNUZ:
        return a.view(np.int8)
    return raw_view(a)


def _ld_kv(a, i):
    """a[i] as float32 for the _raw_kv formats (fp8 unscaled)."""


@overload(_ld_kv, jit_options=HELPER)
def _ld_kv_impl(a, i):
    if a.dtype in (types.uint8, types.int8):
        # e4m3 bits shifted into a float16's fields give 2**-(bias - 15) times the value, subnormals
        # included (F16C converts float16 subnormals at full speed, where float32 subnormal inputs to
        # a multiply take a microcode assist). The arithmetic stays in 16-bit lanes and the NaN test
        # on the float32, else the vectorizer widens every lane to 64 bits.
        # e4m3fn: bias 7, NaN 0x7F / 0xFF (|value| 480 here); e4m3fnuz: bias 8, NaN 0x80 (-0.0 here).
        fn = a.dtype == types.uint8
        rescale = F32(2.0 ** 8 if fn else 2.0 ** 7)

        def ld(a, i):
            x = np.uint16(np.uint8(a[i]))
            h = np.uint16(((x & 0x80) << 8) | ((x & 0x7F) << 7))
            f = (f16_f32(h) if HAS_F16C else F16_TO_F32[h]) * rescale
            nan = abs(f) == F32(480.0) if fn else f32_bits(f) == U32(0x80000000)
            return F32(np.nan) if nan else f
        return ld
    return lambda a, i: load(a, i)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _widen_paged(cache, table, b, h, j0, n, dst):
    """dst[j, :w] = float32(cache[block, slot, h, :]) for the keys j0 + j (j < n) of sequence b.
    Block and slot advance by counting: a division per row costs as much as widening it."""
    bs = cache.shape[1]
    i, slot = j0 // bs, j0 % bs
    for j in range(n):
        row, out = cache[table[b, i], slot, h], dst[j]
        for p in range(row.shape[0]):
            out[p] = _ld_kv(row, p)
        i, slot = (i + 1, 0) if slot == bs - 1 else (i, slot + 1)


@njit(**KERNEL)
def _merge_kernel(part_m, part_l, part_o, first, out, v_scale):
    """out[b, h] = the partitions first[b]:first[b + 1] of sequence b combined: partial outputs
    part_o [parts, heads, dv] (unnormalized) with their running max part_m and sum part_l."""
    heads, dv = out.shape[1], out.shape[2]
    for bh in prange(out.shape[0] * heads):
        b, h = bh // heads, bh % heads
        top = F32(-np.inf)
        for t in range(first[b], first[b + 1]):
            top = max(top, part_m[t, h])
        acc = np.zeros(dv, np.float32)
        total = F32(0.0)
        for t in range(first[b], first[b + 1]):
            w = exp(part_m[t, h] - top) if part_m[t, h] > -np.inf else F32(0.0)
            total += part_l[t, h] * w
            for c in range(dv):
                acc[c] += part_o[t, h, c] * w
        inv = v_scale / total if total > 0 else F32(0.0)
        for c in range(dv):
            store(out[b, h], c, acc[c] * inv)


def _partitions(seq_lens, size):
    """(sequence, first key, end key) of each decode partition, and first[b]: sequence b's first
    partition. Long sequences split into partitions of ~size keys so they spread over threads."""
    lens = np.asarray(seq_lens, np.int64)
    counts = np.maximum(1, -(-lens // size))
    first = np.concatenate([[0], np.cumsum(counts)])
    seq = np.repeat(np.arange(len(lens)), counts)
    idx = np.arange(len(seq)) - first[seq]
    j0 = idx * lens[seq] // counts[seq]  # equal shares
    j1 = (idx + 1) * lens[seq] // counts[seq]
    return np.stack([seq, j0, j1], axis=1).astype(np.int64), first.astype(np.int64)


# ---------------------------------------------------------------- paged_decode_attention

_DECODE_PART = 1024  # keys per partition: a 16K sequence spreads over 16 tasks
_DECODE_CHUNK = 32  # keys per online-softmax step: K and V tiles of 32 x d floats stay in L1
_DG = 4  # query heads per register block of both products (a KV head's group is padded to a multiple)
_pv = _microkernel(_DG, _NR)  # O[4 heads, 64 columns] += P[4 heads, keys] . V[keys, 64 columns]


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _paged_task(q, kc, vc, table, part, qk_scale, softcap, m_out, l_out, o_out):
    """One partition (sequence b, keys j0:j1) for every query head, unnormalized into m_out, l_out
    [heads_q] and o_out [heads_q, dv].

    Chunk by chunk, every KV head in turn: its K rows widened to float32, the scores of its group
    of query heads in 4 x 4 blocks (GQA: K and V are read once for all of them), the online
    softmax, its V rows widened, then P V in the register-blocked microkernel. The tiles stay in
    L1; over the KV heads a chunk's blocks are read whole."""
    b, j0, j1 = part
    hq, d = q.shape[1], q.shape[2]
    hkv, dv = kc.shape[2], vc.shape[3]
    group = hq // hkv
    gp, dp, dvp = _round_up(group, _DG), _round_up(d, _LANES), _round_up(dv, _NR)
    # Padding is zeros: heads with q = 0 (results unused), dims that add nothing.
    qs = np.zeros((hkv, gp, dp), np.float32)
    for h in range(hq):
        for p in range(d):
            qs[h // group, h % group, p] = load(q[b, h], p) * qk_scale
    o = np.zeros((hkv, gp, dvp), np.float32)
    m = np.full((hkv, gp), -np.inf, np.float32)
    l = np.zeros((hkv, gp), np.float32)
    s = np.empty((gp, _DECODE_CHUNK), np.float32)
    kt = np.zeros((_DECODE_CHUNK, dp), np.float32)
    vt = np.zeros((_DECODE_CHUNK, dvp), np.float32)
    for c0 in range(j0, j1, _DECODE_CHUNK):
        n = min(_DECODE_CHUNK, j1 - c0)
        n4 = _round_up(n, 4)  # keys n..n4-1 pad the last 4 x 4 block: p = 0 and V = 0 (0 * inf would be NaN)
        for kvh in range(hkv):
            _widen_paged(kc, table, b, kvh, c0, n, kt)
            for g0 in range(0, gp, _DG):
                for t0 in range(0, n4, 4):
                    _dots(qs[kvh], g0 * dp, dp, kt, t0 * dp, dp, s, g0 * _DECODE_CHUNK + t0, _DECODE_CHUNK, dp)
            for g in range(group):
                row = s[g]
                if softcap > 0:
                    for t in range(n):
                        row[t] = softcap * math.tanh(row[t] / softcap)
                top = m[kvh, g]
                for t in range(n):
                    top = row[t] if row[t] > top else top
                # A head with only -inf scores so far keeps m = -inf and p = exp(-inf - 0) = 0.
                alpha = exp(m[kvh, g] - top) if top > -np.inf else F32(1.0)
                shift = top if top > -np.inf else F32(0.0)
                total = F32(0.0)
                for t in range(n):
                    row[t] = exp(row[t] - shift)
                    total += row[t]
                row[n:n4] = 0.0
                m[kvh, g] = top
                l[kvh, g] = l[kvh, g] * alpha + total
                if alpha != 1:  # the running max grew
                    orow = o[kvh, g]
                    for c in range(dv):
                        orow[c] *= alpha
            _widen_paged(vc, table, b, kvh, c0, n, vt)
            vt[n:n4] = 0.0
            for g0 in range(0, gp, _DG):
                for c in range(0, dvp, _NR):
                    _pv(s, g0 * _DECODE_CHUNK, _DECODE_CHUNK, 1, vt, c, dvp, o[kvh], g0 * dvp + c, dvp, n4, True)
    for h in range(hq):
        m_out[h] = m[h // group, h % group]
        l_out[h] = l[h // group, h % group]
        o_out[h] = o[h // group, h % group, :dv]


@njit(**KERNEL)
def _paged_kernel(q, kc, vc, table, parts, order, bounds, qk_scale, softcap, part_m, part_l, part_o):
    """Thread w runs the partitions order[bounds[w]:bounds[w + 1]]."""
    for w in prange(bounds.shape[0] - 1):
        for i in range(bounds[w], bounds[w + 1]):
            t = order[i]
            _paged_task(q, kc, vc, table, parts[t], qk_scale, softcap, part_m[t], part_l[t], part_o[t])


def paged_decode_attention(outs, q, k_cache, v_cache, block_table, seq_lens, scale, softcap, k_scale, v_scale):
    """One query token per sequence against a paged KV cache (q's dtype or fp8 with scales)."""
    (out,) = outs
    if out.size == 0:
        return
    hq = q.shape[1]
    scale = _default_scale(q) if scale is None else scale
    k_scale = 1.0 if k_scale is None else k_scale
    v_scale = 1.0 if v_scale is None else v_scale
    parts, first = _partitions(seq_lens, _DECODE_PART)
    order, bounds = _balance(parts[:, 2] - parts[:, 1])
    part_m = np.empty((len(parts), hq), np.float32)
    part_l = np.empty((len(parts), hq), np.float32)
    part_o = np.empty((len(parts), hq, v_cache.shape[-1]), np.float32)
    _paged_kernel(raw_view(q), _raw_kv(k_cache), _raw_kv(v_cache), block_table, parts, order.astype(np.int64), bounds,
                  F32(scale * k_scale), F32(softcap or 0.0), part_m, part_l, part_o)
    _merge_kernel(part_m, part_l, part_o, first, raw_view(out), F32(v_scale))


# ---------------------------------------------------------------- mla_decode

_MLA_PART = 1024  # keys per partition


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _mla_task(q_nope, q_pe, latent, k_pe, table, part, scale, m_out, l_out, o_out):
    """One partition of one sequence for all heads: the prefill tile step with the heads as rows,
    keys [latent | k_pe] (d = latent + rope) and values latent (one shared KV head)."""
    b, j0, j1 = part
    heads, dl = q_nope.shape[1], q_nope.shape[2]
    d = dl + q_pe.shape[2]
    dvp = _round_up(dl, _MR)
    mp = _round_up(heads, _NR)
    qt = np.zeros((d, mp), np.float32)
    for h in range(heads):
        for p in range(dl):
            qt[p, h] = load(q_nope[b, h], p) * scale
        for p in range(d - dl):
            qt[dl + p, h] = load(q_pe[b, h], p) * scale
    lo = np.zeros(mp, np.int64)
    hi = np.zeros(mp, np.int64)
    hi[:heads] = j1
    kt, vt, s, o, m, l, alpha = _tile_state(d, dvp, mp)
    for c0 in range(j0, j1, _BN):
        n = min(_BN, j1 - c0)
        _widen_paged(latent.reshape(latent.shape[0], latent.shape[1], 1, dl), table, b, 0, c0, n, kt)
        _widen_paged(k_pe.reshape(k_pe.shape[0], k_pe.shape[1], 1, d - dl), table, b, 0, c0, n, kt[:, dl:])
        vt[:n, :dl] = kt[:n, :dl]
        _tile_step(qt, kt, vt, n, s, o, m, l, alpha, lo, hi, c0, False, F32(0.0))
    for h in range(heads):
        m_out[h] = m[h]
        l_out[h] = l[h]
        for c in range(dl):
            o_out[h, c] = o[c, h]


@njit(**KERNEL)
def _mla_kernel(q_nope, q_pe, latent, k_pe, table, parts, order, bounds, scale, part_m, part_l, part_o):
    for w in prange(bounds.shape[0] - 1):
        for i in range(bounds[w], bounds[w + 1]):
            t = order[i]
            _mla_task(q_nope, q_pe, latent, k_pe, table, parts[t], scale, part_m[t], part_l[t], part_o[t])


def mla_decode(outs, q_nope, q_pe, kv_latent, k_pe, block_table, seq_lens, scale):
    """DeepSeek MLA decode, absorbed form: scores q_nope . c + q_pe . k_pe, values c."""
    (out,) = outs
    if out.size == 0:
        return
    heads, dl = q_nope.shape[1:]
    parts, first = _partitions(seq_lens, _MLA_PART)
    order, bounds = _balance(parts[:, 2] - parts[:, 1])
    part_m = np.empty((len(parts), heads), np.float32)
    part_l = np.empty((len(parts), heads), np.float32)
    part_o = np.empty((len(parts), heads, dl), np.float32)
    _mla_kernel(raw_view(q_nope), raw_view(q_pe), raw_view(kv_latent), raw_view(k_pe), block_table, parts, order.astype(np.int64), bounds,
                F32(scale), part_m, part_l, part_o)
    _merge_kernel(part_m, part_l, part_o, first, raw_view(out), F32(1.0))


KERNELS = (Kernel("attention", attention), Kernel("paged_decode_attention", paged_decode_attention), Kernel("mla_decode", mla_decode))
