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
KV head multiplies its group of query heads (padded to 4) with 4 keys at a time (`_qk_chunk`), then
P V in 4 heads x 64 columns (`_pv_block`), both reading the cache rows in place and widening them in
registers (bfloat16 scores take vdpbf16ps without widening, fp8 K with bfloat16 queries after a
vpermi2b table lookup to bfloat16, and fp8 V then two keys per vdpbf16ps), the online softmax between them in 16 lanes (`_softmax_row`). `attention` with one query per
sequence is decode and takes that path too, its K and V read in place as a paged cache
(`_decode_as_paged`).

bfloat16 prefill on CPUs with AMX (gemm_core's "amx" rung) runs both products on AMX tiles instead
(`_amx_attention_task`): bf16 operands, float32 sums, the same float32 online softmax.
"""
import math

import ml_dtypes
import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload

from .common import (BFloat, BF16, CPU_FEATURES, F32, FASTMATH, HAS_F16C, HELPER, IR_FLAGS, KERNEL, SERIAL_BYTES, Kernel, exp, exp_lanes,
                     lanes_below, load, masked, prefetch, prefetch_line, raw_view, release_openmp, sized, store, store_lanes)
from .gemm_core import RUNG, _amx_begin, _amx_end, _amx_tiles

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


# The products' column step: 64 in AVX-512's 32 registers; AVX2 has 16 ymm, where 6 x 64 floats of accumulators
# would spill, so 6 x 16 (12 ymm accumulators, 2 for B, 1 broadcast). Operands stay padded to multiples of _NR.
_GEMM_NR = _NR if "avx512f" in CPU_FEATURES else _LANES
_mk = _microkernel(_MR, _GEMM_NR)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _gemm(a, a_rs, a_cs, m, b, ldb, n, c, ldc, k, accumulate):
    """C[m, n] (+)= A[m, k] . B[k, n] with m a multiple of _MR and n of _NR (operands padded).
    Column panels outermost: the k x _GEMM_NR panel of B stays in L1 while A streams past it."""
    for c0 in range(0, n, _GEMM_NR):
        for r0 in range(0, m, _MR):
            _mk(a, r0 * a_rs, a_rs, a_cs, b, c0, ldb, c, r0 * ldc + c0, ldc, k, accumulate)


@njit(cache=True)
def _round_up(x, m):
    return -(-x // m) * m


# ---------------------------------------------------------------- online softmax on a tile

@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _softcap(s, n, rows, scale, softcap):
    """Soft-cap the scores S^T [n keys, rows] in place, scale applied, when softcap > 0 (rare: its own
    pass, tanh is a call). Returns the scale left to apply (1 after capping)."""
    if softcap <= 0:
        return scale
    for j in range(n):
        for r in range(rows):
            s[j, r] = softcap * math.tanh(s[j, r] * scale / softcap)
    return F32(1.0)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _tile_max(s, n, rows, scale, lo, hi, j0, masked, softcap, m, l, alpha):
    """The first half of the online softmax on scores S^T [n keys, rows] (keys j0.. of the sequence):
    scale (and soft-cap) them in place, hide the keys a row does not see as -inf (row r sees
    [lo[r], hi[r]); `masked` is False when the whole tile is visible to all rows), and move each row's
    running max m to the tile's; alpha gets the factor rescaling the old accumulator, and the running
    sum l is rescaled. Returns the shift for exp (_exp_tile): m, or 0 for a row that has
    seen no key yet (its m stays -inf and exp(-inf - 0) = 0 gives it p = 0). Hidden keys are -inf
    after scaling, so any scale (0, negative, huge) works. Scale, mask and max are one pass."""
    scale = _softcap(s, n, rows, scale, softcap)
    new = m.copy()
    for j in range(n):
        key = j0 + j
        for r in range(rows):
            x = s[j, r] * scale
            x = x if not masked or (lo[r] <= key) & (key < hi[r]) else F32(-np.inf)
            s[j, r] = x
            new[r] = x if x > new[r] else new[r]
    for r in range(rows):
        alpha[r] = exp(m[r] - new[r]) if new[r] > -np.inf else F32(1.0)
        m[r] = new[r]
        new[r] = new[r] if new[r] > -np.inf else F32(0.0)
        l[r] *= alpha[r]
    return new


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _exp_tile(s, n, rows, shift, l):
    """The second half: P^T = exp(S^T - shift) in place for the n keys of s, l += each row's sum.
    p < 2**-126 is 0: subnormal results (the masked keys' exp(-inf)) and products with them take
    microcode assists (one core, 512 tokens, 16 / 4 heads, d 64, causal: 9.1 -> 7.1 ms)."""
    for j in range(n):
        for r in range(rows):
            x = s[j, r] - shift[r]
            p = F32(0.0) if x < F32(-87.0) else exp(x)  # NaN passes
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
    _exp_tile(s, n, mp, _tile_max(s, n, mp, F32(1.0), lo, hi, j0, masked, softcap, m, l, alpha), l)  # the scale is in qt
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
            prefetch(row, i)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _store_rows(o, l, rows, out, t0, bm, h0):
    """The first `rows` columns of O^T [dv, rows] divided by their softmax sums l, into out: row r
    is (token t0 + r % bm, head h0 + r // bm). 16 x 16 blocks through registers (_store_block): the
    scalar loop through a transposed buffer took ~0.6 of ~4 ms of a bf16 causal prefill (512 tokens,
    16 / 4 heads, d 64, one core)."""
    dv = out.shape[2]
    offs = np.empty(16, np.int64)
    for r0 in range(0, rows, 16):
        nr = min(16, rows - r0)
        for i in range(nr):
            offs[i] = ((t0 + (r0 + i) % bm) * out.shape[1] + h0 + (r0 + i) // bm) * dv
        for c0 in range(0, dv, 16):
            _store_block(o, r0, c0, dv, l, out, offs, nr)


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
    _store_rows(o, l, rows, out, qs0 + i0, bm, h0)


@njit(**KERNEL)
def _attention_kernel(q, k, v, out, tasks, bounds, scale, causal, window, softcap):
    """Thread w runs tasks[bounds[w]:bounds[w + 1]] (a static, cost-balanced split)."""
    for w in prange(bounds.shape[0] - 1):
        for t in range(bounds[w], bounds[w + 1]):
            _attention_task(q, k, v, out, tasks[t], scale, causal, window, softcap)


_AMX_BN = 128  # keys per tile on AMX: four 32-key chunks of the P V product; against 64 (one core, causal, bf16):
# 512 x 16 / 4 heads x d 64 2.82 -> 2.67 ms, 2048 tokens 39.8 -> 32.9, 4096 x 8 / 8 x d 128 121 -> 109 (256: no better)


@intrinsic
def _softmax_vnni(typingctx, s, n, nc, ld, scale, masked, lo, hi, j0, m, l, o, dv, r, pb, w):
    """The online softmax of query rows r .. r + 15 over a key tile, in 16 lanes: S^T s [keys, ld]
    (float32, n keys) times scale, keys j0 + j outside a row's [lo, hi) -inf where masked; the running
    max m and sum l updated and O^T o [dv, ld] rescaled; P^T = exp(s - shift) (0 for keys >= n, up to
    nc) written as the VNNI words of P = hi + lo into pb (uint32): key pair i at pb[w + 512 (i // 16)
    + 16 (i % 16)], its lo 256 words on. Hi is the nearest bfloat16 (round to nearest even), lo the
    one nearest p - hi (vcvtne2ps2bf16 reads a subnormal lo as 0, as the tile product does). Both
    passes over the strip's scores run while they are in L1: with the cut below 2**-126 it replaced
    three tile-wide passes (scale-mask-max, rescale, exp-round-pack) and took a causal prefill (one core,
    512 tokens, 16 / 4 heads, d 64) from 5.1 to 4.0 ms; ~0.6 ns a score."""
    sig = types.void(s, n, nc, ld, scale, masked, lo, hi, j0, m, l, o, dv, r, pb, w)

    def codegen(context, builder, sig, args):
        ps, n, nc, ld, scale, masked_, plo, phi, j0, pm, pl, po, dv, r, ppb, w = _args(context, builder, sig, args,
                                                                                       (0, 6, 7, 9, 10, 11, 14))
        f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
        vec, ivec, kvec = ir.VectorType(f32, _LANES), ir.VectorType(i32, _LANES), ir.VectorType(i64, _LANES)

        def ptr(base, off, t=vec):
            return builder.bitcast(builder.gep(base, [off]), t.as_pointer())

        def splat(x, t):
            return builder.shuffle_vector(builder.insert_element(ir.Constant(t, ir.Undefined), x, i32(0)), ir.Constant(t, ir.Undefined),
                                          ir.Constant(ivec, [0] * _LANES))

        cvt = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VectorType(BFloat(), 32), [vec, vec]),
                                             "llvm.x86.avx512bf16.cvtne2ps2bf16.512")
        interleave = ir.Constant(ir.VectorType(i32, 32), [x // 2 + 16 * (x % 2) for x in range(32)])

        def words(a, b):  # (bfloat16(a) low, bfloat16(b) high) by vcvtne2ps2bf16 and vpermw, ~1/3 of the integer steps
            x = builder.bitcast(builder.call(cvt, [b, a]), ir.VectorType(ir.IntType(16), 32))
            return builder.bitcast(builder.shuffle_vector(x, x, interleave), ivec)

        row_lo, row_hi = builder.load(ptr(plo, r, kvec), align=8), builder.load(ptr(phi, r, kvec), align=8)
        everyone = splat(builder.icmp_signed("==", masked_, i64(0)), ir.VectorType(ir.IntType(1), _LANES))
        scale, old = splat(scale, vec), builder.load(ptr(pm, r), align=4)
        top_x, minus_inf = cgutils.alloca_once_value(builder, old), ir.Constant(vec, [-math.inf] * _LANES)
        with cgutils.for_range(builder, n) as loop:  # scale, mask, max
            at = ptr(ps, builder.add(builder.mul(loop.index, ld), r))
            key = splat(builder.add(j0, loop.index), kvec)
            seen = builder.or_(builder.and_(builder.icmp_signed("<=", row_lo, key), builder.icmp_signed("<", key, row_hi)), everyone)
            x = builder.select(seen, builder.fmul(builder.load(at, align=4), scale, flags=IR_FLAGS), minus_inf)
            builder.store(x, at, align=4)
            cur = builder.load(top_x)
            builder.store(builder.select(builder.fcmp_ordered(">", x, cur, flags=IR_FLAGS), x, cur), top_x)
        new = builder.load(top_x)
        found = builder.fcmp_ordered(">", new, minus_inf, flags=IR_FLAGS)
        alpha = builder.select(found, exp_lanes(builder, builder.fsub(old, new, flags=IR_FLAGS)), ir.Constant(vec, [1.0] * _LANES))
        builder.store(new, ptr(pm, r), align=4)
        shift = builder.select(found, new, ir.Constant(vec, [0.0] * _LANES))
        total = cgutils.alloca_once_value(builder, builder.fmul(builder.load(ptr(pl, r), align=4), alpha, flags=IR_FLAGS))
        with cgutils.for_range(builder, dv) as loop:  # rescale O^T
            at = ptr(po, builder.add(builder.mul(loop.index, ld), r))
            builder.store(builder.fmul(builder.load(at, align=4), alpha, flags=IR_FLAGS), at, align=4)
        # p < 2**-126 is 0: exp's subnormal results (the masked keys' exp(-inf)) take microcode assists (a
        # diagonal tile's strip: 3.1 against 0.66 ns a score), and the tile product reads them as 0 anyway.
        floor, zero = ir.Constant(vec, [-87.0] * _LANES), ir.Constant(vec, [0.0] * _LANES)
        with cgutils.for_range(builder, builder.sdiv(nc, i64(2))) as loop:  # exp, sum, VNNI words of hi and lo
            p_pair = []
            for key in (builder.mul(loop.index, i64(2)), builder.add(builder.mul(loop.index, i64(2)), i64(1))):
                x = builder.fsub(builder.load(ptr(ps, builder.add(builder.mul(key, ld), r)), align=4), shift, flags=IR_FLAGS)
                tiny = builder.fcmp_ordered("<", x, floor, flags=IR_FLAGS)
                p = builder.select(tiny, zero, exp_lanes(builder, builder.select(tiny, floor, x)))
                p = builder.select(builder.icmp_signed("<", key, n), p, zero)
                builder.store(builder.fadd(builder.load(total), p, flags=IR_FLAGS), total)
                p_pair.append(p)
            hi_w = words(*p_pair)
            hi_f = (builder.shl(hi_w, ir.Constant(ivec, [16] * _LANES)), builder.and_(hi_w, ir.Constant(ivec, [-65536] * _LANES)))
            lo_w = words(*(builder.fsub(p, builder.bitcast(h, vec), flags=IR_FLAGS) for p, h in zip(p_pair, hi_f)))
            off = builder.add(w, builder.add(builder.mul(builder.lshr(loop.index, i64(4)), i64(512)),
                                             builder.mul(builder.and_(loop.index, i64(15)), i64(16))))
            for word, at in ((hi_w, off), (lo_w, builder.add(off, i64(256)))):
                builder.store(word, ptr(ppb, at, ivec), align=4)
        builder.store(builder.load(total), ptr(pl, r), align=4)
        return context.get_dummy_value()

    return sig, codegen


def _transpose16(builder, w):
    """The 16 x 16 transpose of 16 vectors of 16 32-bit lanes: 4 stages of two-source shuffles, each
    swapping the off-diagonal blocks of its size."""
    w, size = list(w), 8
    while size:
        low = ir.Constant(ir.VectorType(ir.IntType(32), _LANES), [_LANES + x - size if x & size else x for x in range(_LANES)])
        high = ir.Constant(ir.VectorType(ir.IntType(32), _LANES), [_LANES + x if x & size else x + size for x in range(_LANES)])
        for r in range(16):
            if not r & size:
                w[r], w[r + size] = builder.shuffle_vector(w[r], w[r + size], low), builder.shuffle_vector(w[r], w[r + size], high)
        size //= 2
    return w


@intrinsic
def _store_block(typingctx, o, r, c0, dv, l, out, offs, nr):
    """Rows r .. r + 15, columns c0 .. c0 + 15 (those < dv) of O^T o [>= dv, ld] divided by the rows'
    softmax sums l (times 1 / l; a row with l = 0, which saw no key, gets zeros) into out (float32 or a 16-bit raw
    view, C-contiguous): row r + i, i < nr, at element offsets[i] + c0. O^T is read along its rows and
    transposed in registers (_transpose16)."""
    sig = types.void(o, r, c0, dv, l, out, offs, nr)

    def codegen(context, builder, sig, args):
        po, r, c0, dv, pl, pout, poffs, nr = _args(context, builder, sig, args, (0, 4, 5, 6))
        ld = builder.extract_value(context.make_array(sig.args[0])(context, builder, args[0]).shape, 1)
        i64 = ir.IntType(64)
        vec, ivec = ir.VectorType(ir.FloatType(), _LANES), ir.VectorType(ir.IntType(32), _LANES)
        total = builder.load(builder.bitcast(builder.gep(pl, [r]), vec.as_pointer()), align=4)
        total = builder.select(builder.fcmp_ordered(">", total, ir.Constant(vec, [0.0] * _LANES)), total,
                               ir.Constant(vec, [math.inf] * _LANES))
        inv = builder.fdiv(ir.Constant(vec, [1.0] * _LANES), total, flags=IR_FLAGS)  # 16 divisions per block cost ~1/3 of it
        last = builder.sub(dv, i64(1))
        cols = []
        for c in range(16):  # columns past dv read the last one (in bounds, never stored)
            col = builder.add(c0, i64(c))
            col = builder.select(builder.icmp_signed("<", col, dv), col, last)
            x = builder.load(builder.bitcast(builder.gep(po, [builder.add(builder.mul(col, ld), r)]), vec.as_pointer()), align=4)
            cols.append(builder.bitcast(builder.fmul(x, inv, flags=IR_FLAGS), ivec))
        mask = lanes_below(builder, builder.sub(dv, c0), _LANES)
        for i, row in enumerate(_transpose16(builder, cols)):
            with builder.if_then(builder.icmp_signed("<", i64(i), nr)):
                at = builder.gep(pout, [builder.add(builder.load(builder.gep(poffs, [i64(i)])), c0)])
                store_lanes(builder, sig.args[5].dtype, at, mask, builder.bitcast(row, vec))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _vt_tile(typingctx, v, base, ld, n, c0, dv, dst, d_off):
    """The AMX A tile of V^T for 16 value columns c0.. and 32 keys: dst[d_off + 32 c + j] = V_j[c0 + c],
    V_j the bfloat16 row at v[base + j * ld] (int16), keys j >= n and columns >= dv 0 (not read);
    stored twice, at d_off and d_off + 512, as the P V product takes it once per term of P.
    Key pairs (2i, 2i + 1) become 32-bit words W[i] over the columns, and a 16 x 16 transpose of the
    words (_transpose16) turns them into the tile's rows (the scalar loop it replaces took ~8 of ~40 us
    per 64-key tile at d 128)."""
    sig = types.void(v, base, ld, n, c0, dv, dst, d_off)

    def codegen(context, builder, sig, args):
        pv, base, ld, n, c0, dv, pd, d_off = _args(context, builder, sig, args, (0, 6))
        i64, i32 = ir.IntType(64), ir.IntType(32)
        words = ir.VectorType(i32, _LANES)
        cols = lanes_below(builder, builder.sub(dv, c0), _LANES)
        rows = []
        for j in range(32):
            mask = builder.and_(cols, builder.select(builder.icmp_signed("<", ir.Constant(i64, j), n),
                                                     ir.Constant(cols.type, [1] * _LANES), ir.Constant(cols.type, [0] * _LANES)))
            x = masked(builder, "load", builder.gep(pv, [builder.add(builder.add(base, builder.mul(ir.Constant(i64, j), ld)), c0)]), mask)
            rows.append(builder.zext(builder.bitcast(x, ir.VectorType(ir.IntType(16), _LANES)), words))
        w = _transpose16(builder, [builder.or_(rows[2 * i], builder.shl(rows[2 * i + 1], ir.Constant(words, [16] * _LANES)))
                                   for i in range(16)])
        out = builder.gep(pd, [d_off])
        for copy in (0, 512):
            for c in range(16):
                builder.store(w[c], builder.bitcast(builder.gep(out, [ir.Constant(i64, copy + 32 * c)]), words.as_pointer()), align=2)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _finite_rows(a, n):
    """Whether a[:n] (a bfloat16 int16 view) holds no inf or NaN: exponent bits not all ones."""
    for j in range(n):
        for c in range(a.shape[1]):
            if a[j, c] & 0x7F80 == 0x7F80:
                return False
    return True


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _amx_attention_task(q, k, v, out, task, scale, causal, window, softcap):
    """_attention_task for bfloat16 (int16 views) on AMX tiles, in the same transposed layout:
    S^T = K Q^T and O^T += V^T P^T are bf16 tile products summed in float32 (gemm_core._amx_tiles,
    32 x 32 blocks) and the online softmax runs in float32 on S^T, 16 rows at a time (_softmax_vnni
    writes P^T straight into the second product's tiles). P enters that product as two bfloat16 terms,
    P = hi + lo, keeping 16 bits: rounded to one bfloat16 as FlashAttention does on GPUs, P's error
    alone takes the output to 0.8-0.95 of the conformance tolerance (2x the naive bf16 error),
    against 0.5 in float32. The scale multiplies S in float32.

    The "A" tiles (16 x 32) are K's rows where they lie in k (d a multiple of 32), else K packed
    into [row tile, k chunk, 16, 32], and V^T transposed per tile (_vt_tile) into [row tile, k chunk,
    2 copies, 16, 32]; the VNNI "B" tiles are Q's [column tile, k chunk, 16 pairs, 16] and P^T's
    [column tile, k chunk, hi / lo, 16 pairs, 16], so one pass of k steps over O^T takes both terms
    of P. Padding is zeros (a stale inf times a zero would be NaN). Tile addresses are taken from
    the arrays where they are used: Numba frees an array after its last use by name, so an address
    kept in a variable can outlive the buffer (on 2 threads that gave NaN columns in S, from a
    reused Q buffer)."""
    qs0, ks0, sq, sk, kvh, h0, hn, i0, bm = task
    d, dv = q.shape[2], v.shape[2]
    dc, kc, dvp = -(-d // 32), _AMX_BN // 32, _round_up(dv, 32)
    rows = hn * bm
    mp = _round_up(rows, 32)
    qrows = np.zeros((mp, 32 * dc), np.int16)  # zero-padded to whole k chunks
    lo = np.zeros(mp, np.int64)
    hi = np.zeros(mp, np.int64)
    for r in range(rows):
        qrows[r, :d] = q[qs0 + i0 + r % bm, h0 + r // bm]
        lo[r], hi[r] = _visible(i0 + r % bm + sk - sq, sk, causal, window)
    # Q's VNNI tiles are its rows' words (dim pairs) transposed: a plain loop. gemm_core._pack_tile
    # takes a slice per row, which cost more than the key tiles of a small model's causal prefill
    # (512 tokens, 14 / 2 heads, d 64, one core: 12.5 -> 5.4 ms with the other changes, SDPA 7.4).
    qw = qrows.view(np.uint32)
    qb = np.empty((mp // 16, dc, 16, 16), np.uint32)
    for t in range(mp // 16):
        for c in range(dc):
            for i in range(16):
                for rr in range(16):
                    qb[t, c, i, rr] = qw[16 * t + rr, 16 * c + i]
    k_lo, k_hi = lo[:rows].min(), hi[:rows].max()
    all_lo, all_hi = lo[:rows].max(), hi[:rows].min()  # keys in [all_lo, all_hi) are seen by every row
    ka = np.zeros((_AMX_BN // 16, dc, 16, 32), np.int16)
    va = np.empty((dvp // 16, kc, 2, 16, 32), np.int16)  # both written in full where read
    pb = np.empty((mp // 16, kc, 2, 16, 16), np.uint32)
    s = np.empty((_AMX_BN, mp), np.float32)
    o = np.zeros((dvp, mp), np.float32)
    m = np.full(mp, -np.inf, np.float32)
    l = np.zeros(mp, np.float32)
    alpha = np.empty(mp, np.float32)
    ldv = v.strides[0] // v.itemsize  # v is C-contiguous
    _amx_begin()
    for j0 in range(k_lo, k_hi, _AMX_BN):
        n = min(_AMX_BN, k_hi - j0)
        nc = _round_up(n, 32)
        kt, vt = k[ks0 + j0:ks0 + j0 + n, kvh], v[ks0 + j0:ks0 + j0 + n, kvh]
        # K rows are A tiles as they lie in k when d is a multiple of 32 and all nc rows exist (rows past
        # n give scores no one reads); else packed, zero-padded, into ka.
        in_place = d % 32 == 0 and ks0 + j0 + nc <= k.shape[0]
        if not in_place:
            for j in range(nc):
                for p in range(d):
                    ka[j // 16, p // 32, j % 16, p % 32] = kt[j, p] if j < n else 0
        lda, a_step, a_tile = (k.strides[0], 64, 16 * k.strides[0]) if in_place else (64, 1024, dc * 1024)
        for i in range(0, nc, 32):
            for r in range(0, mp, 32):
                a0 = (k.ctypes.data + (ks0 + j0) * k.strides[0] + kvh * k.strides[1] if in_place else ka.ctypes.data) + i // 16 * a_tile
                b0 = qb.ctypes.data + r // 16 * dc * 1024
                _amx_tiles(a0, a0 + a_tile, lda, a_step, b0, b0 + dc * 1024, dc, s.ctypes.data + (i * mp + r) * 4, mp * 4, False)
        masked = j0 < all_lo or j0 + n > all_hi
        if masked and not _finite_rows(vt, n):
            # A NaN / inf of V at a key some rows may not see: those rows leave it out (see _tile_step).
            _exp_tile(s, n, mp, _tile_max(s, n, mp, scale, lo, hi, j0, masked, softcap, m, l, alpha), l)
            for c in range(dv):
                for r in range(mp):
                    o[c, r] *= alpha[r]
            for j in range(n):
                for r in range(mp):
                    if lo[r] <= j0 + j < hi[r]:
                        for c in range(dv):
                            o[c, r] += s[j, r] * load(vt[j], c)
            continue
        scaled = _softcap(s, n, mp, scale, softcap)
        for r in range(0, mp, 16):
            _softmax_vnni(s, n, nc, mp, scaled, masked, lo, hi, j0, m, l, o, dv, r, pb, r // 16 * kc * 512)
        for ct in range(dvp // 16):
            for jc in range(nc // 32):
                _vt_tile(v, (ks0 + j0 + 32 * jc) * ldv + kvh * dv, ldv, n - 32 * jc, 16 * ct, dv, va, (ct * kc + jc) * 1024)
        # One pass over O^T for both terms of P: k steps (chunk 0, hi), (chunk 0, lo), (chunk 1, hi), ..
        for c in range(0, dvp, 32):
            for r in range(0, mp, 32):
                a0, b0 = va.ctypes.data + c // 16 * kc * 2048, pb.ctypes.data + r // 16 * kc * 2048
                _amx_tiles(a0, a0 + kc * 2048, 64, 1024, b0, b0 + kc * 2048, nc // 16, o.ctypes.data + (c * mp + r) * 4, mp * 4, True)
    _amx_end()
    _store_rows(o, l, rows, out, qs0 + i0, bm, h0)


@njit(**KERNEL)
def _amx_attention_kernel(q, k, v, out, tasks, bounds, scale, causal, window, softcap):
    """_attention_kernel with _amx_attention_task (a kernel of its own: its tile instructions only
    compile where gemm_core found AMX)."""
    for w in prange(bounds.shape[0] - 1):
        for t in range(bounds[w], bounds[w + 1]):
            _amx_attention_task(q, k, v, out, tasks[t], scale, causal, window, softcap)


@njit(cache=True)
def _balance(costs, workers):
    """(order, bounds): task indices grouped per thread, threads' total costs nearly equal.
    Tasks are dealt most expensive first in snake order (0, 1, .., W-1, W-1, .., 0, 0, ..)."""
    rank = np.argsort(-costs, kind="mergesort")
    order, bounds = np.empty(len(rank), np.int64), np.zeros(workers + 1, np.int64)
    for w in range(workers):
        bounds[w + 1] = bounds[w]
        for i in range(w, len(rank), 2 * workers):  # turns w and 2W - 1 - w of every round
            order[bounds[w + 1]] = rank[i]
            bounds[w + 1] += 1
            if i + 2 * (workers - w) - 1 < len(rank):
                order[bounds[w + 1]] = rank[i + 2 * (workers - w) - 1]
                bounds[w + 1] += 1
    return order, bounds


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
    order, bounds = _balance(np.concatenate(costs), numba.get_num_threads())
    return np.ascontiguousarray(np.concatenate(tasks)[order], dtype=np.int64), bounds


def _default_scale(q):
    """1 / sqrt(d); with d = 0 every score is 0 whatever the scale."""
    return 1.0 / math.sqrt(max(q.shape[-1], 1))


@njit(cache=True)
def _block_table(starts, length, bs, blocks):
    """The block table of rows cut into `blocks` blocks of bs rows (bs dividing every start): row i
    starts at block starts[i] // bs and covers `length` rows. Entries past the last block (past
    their sequence's length, never read) point at the last block."""
    table = np.empty((len(starts), -(-length // bs)), np.int32)
    for i in range(len(starts)):
        for j in range(table.shape[1]):
            table[i, j] = min(starts[i] // bs + j, blocks - 1)
    return table


def _decode_as_paged(out, q, k, v, scale, window, softcap, cu_seqlens_q, cu_seqlens_k):
    """One query per sequence is decode: the keys a query sees, [max(0, sk - window), sk) whether
    causal or not, become a paged cache for paged_decode_attention, whose tasks keep a KV head's
    query group in registers (a prefill task would pad its rows to 64). K and V are read in place
    when their rows are C-contiguous: varlen or dense [B, Sk, Hkv, D] as [tokens, Hkv, D], and
    dense views of [B, Hkv, Sk, D] memory (as transformers passes them) as B * Hkv sequences of one
    KV head each. Returns False when the call is not decode."""
    if cu_seqlens_q is None:
        if q.shape[1] != 1:
            return False
        b, sk, hkv = k.shape[0], k.shape[1], k.shape[2]
        first = max(0, sk - window) if window else 0
        if sk == first:  # no keys: zeros
            out[...] = 0
            return True
        q, out = q[:, 0], out[:, 0]
        if all(x.transpose(0, 2, 1, 3).flags.c_contiguous for x in (k, v)) and out.flags.c_contiguous:
            k, v = (x.transpose(0, 2, 1, 3).reshape(b * hkv * sk, 1, x.shape[3]) for x in (k, v))
            q, out = q.reshape(b * hkv, -1, q.shape[2]), out.reshape(b * hkv, -1, out.shape[2])  # views: out is written
            b = b * hkv
        else:
            k, v = (np.ascontiguousarray(x).reshape(b * sk, hkv, x.shape[3]) for x in (k, v))
        starts, seq_lens, bs = np.arange(b) * sk + first, np.full(b, sk - first, np.int32), math.gcd(sk, first)
    else:
        cq, ck = np.asarray(cu_seqlens_q, np.int64), np.asarray(cu_seqlens_k, np.int64)
        if not (np.diff(cq) == 1).all():
            return False
        starts = np.maximum(ck[:-1], ck[1:] - window) if window else ck[:-1]
        seq_lens = (ck[1:] - starts).astype(np.int32)
        if seq_lens.max() == 0:
            out[...] = 0
            return True
        k, v = np.ascontiguousarray(k), np.ascontiguousarray(v)
        bs = int(np.gcd.reduce(np.append(starts, k.shape[0])))
    blocks = k.shape[0] // bs
    if cu_seqlens_q is None and first == 0:  # one block per sequence: no compiled call for the table (decode's per-call cost)
        table = np.arange(b, dtype=np.int32).reshape(b, 1)
    else:
        table = _block_table(starts, int(seq_lens.max()), bs, blocks)
    k_cache, v_cache = (x.reshape(blocks, bs, *x.shape[1:]) for x in (k, v))
    paged_decode_attention((out,), q, k_cache, v_cache, table, seq_lens, scale, softcap, None, None)
    return True


def attention(outs, q, k, v, causal, scale, window, softcap, cu_seqlens_q, cu_seqlens_k):
    """softmax(q k^T * scale) v, dense [B, S, H, D] or varlen [T, H, D] with cu_seqlens."""
    (out,) = outs
    if out.size == 0:
        return
    scale = _default_scale(q) if scale is None else scale
    if _decode_as_paged(out, q, k, v, scale, int(window or 0), softcap, cu_seqlens_q, cu_seqlens_k):
        return
    q, k, v = (np.ascontiguousarray(x) for x in (q, k, v))  # a prefill reads each row many times
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
        kernel = _amx_attention_kernel if RUNG == "amx" and q.dtype == BF16 else _attention_kernel
        release_openmp()
        kernel(raw_view(q), raw_view(k), raw_view(v), raw_view(out), tasks, bounds, F32(scale), bool(causal), int(window or 0),
                          F32(softcap or 0.0))


# ---------------------------------------------------------------- decode: fp8 caches, partitions, merge

# fp8 e4m3 caches are read as uint8 (e4m3fn) or int8 (e4m3fnuz) and widened through float16 fields,
# which leave the value times 2**-(bias - 15): the caller folds the inverse into k_scale and v_scale.
_FP8_KV = {np.dtype(ml_dtypes.float8_e4m3fn): (np.uint8, 2.0 ** 8), np.dtype(ml_dtypes.float8_e4m3fnuz): (np.int8, 2.0 ** 7)}


def _kv_operand(cache):
    """(array the decode kernel reads, factor its values are off by) for a KV cache: fp8 as its
    integer view; float16 and fp8 as a float32 copy where the CPU lacks F16C; rows with a unit stride."""
    kind, factor = _FP8_KV.get(cache.dtype, (None, 1.0))
    if not HAS_F16C and (kind is not None or cache.dtype == np.float16):
        cache, kind, factor = cache.astype(np.float32), None, 1.0
    raw = cache.view(kind) if kind is not None else raw_view(cache)
    return (raw if raw.strides[-1] == raw.itemsize else np.ascontiguousarray(raw)), factor


def _kv_vector(builder, dtype, base, off, mask):
    """The len(mask) cache elements at base[off:] as <len(mask) x float>, lanes outside `mask` (<N x i1>)
    read as 0 without touching memory. dtype is the Numba type of the raw cache (see _kv_operand).
    fp8 takes 32 lanes per call where it can: its integer steps then run on one register for 32."""
    lanes = mask.type.count
    i16, i32 = ir.IntType(16), ir.IntType(32)
    x = masked(builder, "load", builder.gep(base, [off]), mask)
    f32s, f16s = ir.VectorType(ir.FloatType(), lanes), ir.VectorType(ir.HalfType(), lanes)

    def splat(t, v):
        return ir.Constant(ir.VectorType(t, lanes), [v] * lanes)

    if dtype == types.float32:
        return x
    if dtype == types.uint16:  # float16: vcvtph2ps
        return builder.fpext(builder.bitcast(x, f16s), f32s)
    if dtype == types.int16:  # bfloat16 is the top half of a float32
        return builder.bitcast(builder.shl(builder.zext(x, ir.VectorType(i32, lanes)), splat(i32, 16)), f32s)
    # e4m3: sign to bit 15, exponent and mantissa to bits 7..13 of a float16, where F16C converts
    # subnormals at full speed (float32 subnormal inputs to a multiply take a microcode assist):
    # shifted left by 7 the sign is bit 14, and adding bit 14 to itself carries it into bit 15.
    # NaN: e4m3fn 0x7F / 0xFF, e4m3fnuz 0x80 (which would be -0.0); the format has no inf.
    x = builder.zext(x, ir.VectorType(i16, lanes))
    h = builder.shl(x, splat(i16, 7))
    h = builder.add(h, builder.and_(h, splat(i16, 0x4000)))
    nan = (builder.icmp_unsigned("==", builder.and_(x, splat(i16, 0x7F)), splat(i16, 0x7F)) if dtype == types.uint8
           else builder.icmp_unsigned("==", x, splat(i16, 0x80)))
    return builder.fpext(builder.bitcast(builder.select(nan, splat(i16, 0x7E00), h), f16s), f32s)


def _halves(builder, x):
    """The two halves of a vector."""
    n = x.type.count // 2
    return [builder.shuffle_vector(x, x, ir.Constant(ir.VectorType(ir.IntType(32), n), list(range(h * n, h * n + n)))) for h in (0, 1)]


def _pieces(builder, x, lanes):
    """x cut into vectors of `lanes` lanes."""
    n = x.type.count
    return [x] if n == lanes else [builder.shuffle_vector(x, x, ir.Constant(ir.VectorType(ir.IntType(32), lanes), list(range(h, h + lanes)))) for h in range(0, n, lanes)]


def _concat(builder, x, y):
    """Vectors x and y as one of twice their lanes."""
    n = x.type.count
    return builder.shuffle_vector(x, y, ir.Constant(ir.VectorType(ir.IntType(32), 2 * n), list(range(2 * n))))


def _args(context, builder, sig, args, arrays):
    """The data pointers of the array arguments at `arrays`, floats as they are, every other argument as an i64."""
    return [context.make_array(sig.args[i])(context, builder, args[i]).data if i in arrays
            else args[i] if isinstance(sig.args[i], types.Float) else context.cast(builder, args[i], sig.args[i], types.int64)
            for i in range(len(args))]


def _fold(builder, x, op):
    """op (a function of two vectors) applied across the lanes of x, a tree of halves: the result in lane 0."""
    width = x.type.count
    while width > 1:
        width //= 2
        half = builder.shuffle_vector(x, x, ir.Constant(ir.VectorType(ir.IntType(32), x.type.count), [(i + width) % x.type.count for i in range(x.type.count)]))
        x = op(x, half)
    return builder.extract_element(x, ir.Constant(ir.IntType(32), 0))


def _fp8_table(dtype):
    """The bfloat16 bits of the 128 fp8 magnitudes as _kv_vector scales them (the float16 with the
    magnitude's 7 bits at bits 7..13), split into low and high bytes; e4m3fn's 0x7F is NaN."""
    bits = (np.arange(128, dtype=np.uint16) << 7).view(np.float16).astype(np.float32).view(np.uint32) >> 16
    if dtype == types.uint8:
        bits[127] = 0x7FC0
    return [[int(x) for x in bits & 0xFF], [int(x) for x in bits >> 8]]


def _fp8_words(builder, dtype, base, off, mask):
    """The 64 fp8 cache elements at base[off:] (lanes outside `mask`, <64 x i1>, 0) as bfloat16, two
    vectors of 16 words of pairs: elements 0-7, 16-23, 32-39, 48-55, then the other eight of each 16.
    Two vpermi2b look up the low and high bytes of each magnitude's bfloat16 (128 entries: the 7 index
    bits of vpermi2b), the sign goes into the high byte, and a byte interleave within 128-bit lanes
    (vpunpcklbw, vpunpckhbw) makes the words: 5 steps for 64 elements, where widening through float16
    (_kv_vector) and packing took ~14 for 32."""
    i8, i32 = ir.IntType(8), ir.IntType(32)
    v64 = ir.VectorType(i8, 64)
    x = masked(builder, "load", builder.gep(base, [off]), mask)
    if dtype == types.int8:
        x = builder.bitcast(x, v64)
    perm = cgutils.get_or_insert_function(builder.module, ir.FunctionType(v64, [v64, v64, v64]), "llvm.x86.avx512.vpermi2var.qi.512")
    lo, hi = (builder.call(perm, [ir.Constant(v64, t[:64]), x, ir.Constant(v64, t[64:])]) for t in _fp8_table(dtype))
    hi = builder.or_(hi, builder.and_(x, ir.Constant(v64, [0x80] * 64)))
    if dtype == types.int8:  # e4m3fnuz's NaN is 0x80 (would be -0.0)
        nan = builder.icmp_unsigned("==", x, ir.Constant(v64, [0x80] * 64))
        lo, hi = builder.select(nan, ir.Constant(v64, [0xC0] * 64), lo), builder.select(nan, ir.Constant(v64, [0x7F] * 64), hi)
    words = ir.VectorType(i32, _LANES)
    return [builder.bitcast(builder.shuffle_vector(lo, hi, ir.Constant(ir.VectorType(i32, 64), [k for lane in range(4) for r in rs
                                                                                               for k in (16 * lane + r, 64 + 16 * lane + r)])), words)
            for rs in (range(8), range(8, 16))]


def _prefetch_row(builder, ptr, nbytes):
    """IR: start loading the nbytes (an i64) at ptr (an i8*), one prefetch a cache line."""
    i64 = ir.IntType(64)
    with cgutils.for_range_slice(builder, i64(0), nbytes, i64(64)) as (off, _):
        prefetch_line(builder, builder.gep(ptr, [off]), False, _PREFETCH_LOCALITY)


@intrinsic
def _qk_chunk(typingctx, q, q_off, ldq, cache, rows, h_off, n, s, s_off, lds, d, ahead, ahead_off, n_ahead):
    """S[i, j] = Q[i, :d] . K_j[:d] for 4 query heads i and the keys j < n (rounded up to 4; S and
    rows padded), K_j read from the cache at element rows[j] + h_off and widened on the fly (Q:
    float32 rows at q[q_off + i * ldq], zero-padded to a multiple of 16; S[i, j] to s[s_off + i * lds
    + j]); the rows ahead[j] + ahead_off of the keys j < n_ahead are prefetched on the way,
    4 after each block (issued all at once they filled the line fill buffers and stalled the compute).
    With Q in bfloat16 (int16, padded to 32) and a bfloat16 cache, vdpbf16ps takes 32 of each per
    instruction: products of two bfloat16 are exact in float32, and the cache needs no widening.

    4 keys at a time: sixteen 16-lane accumulators, each loaded vector feeding four FMAs; the sixteen
    horizontal sums are one transposing tree: each stage adds the two halves of every pair of vectors'
    partial sums, so 15 adds and 30 shuffles leave the 16 dot products in the lanes of one vector.
    One call per chunk, unmasked but for d's tail: a call per 4 keys (with the mask of every step and
    the prefetches as a Numba call) took ~18 of ~42 ns per key and KV head (bf16, d 128, one core).
    AVX2 (_DECODE_LANES 8): the 4 keys in two passes of 2, eight 8-lane accumulators each: sixteen held
    in 16 registers spilled every FMA's accumulator to the stack; per core on AMD EPYC Zen 3 a whole
    decode (bf16 KV, 4 x 4096 keys) went from 16.0 to 11.4 ms, fp8 e4m3fn from 27.8 to 11.7 ms
    with _pv_block's change."""
    sig = types.void(q, q_off, ldq, cache, rows, h_off, n, s, s_off, lds, d, ahead, ahead_off, n_ahead)

    def codegen(context, builder, sig, args):
        pq, q_off, ldq, pk, prow, h_off, n, ps, s_off, lds, d, pahead, ahead_off, n_ahead = _args(context, builder, sig, args, (0, 3, 4, 7, 11))
        f32, i64 = ir.FloatType(), ir.IntType(64)
        lanes = _DECODE_LANES
        vec = ir.VectorType(f32, lanes)
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]), f"llvm.fma.v{lanes}f32")
        pq, ps = builder.gep(pq, [q_off]), builder.gep(ps, [s_off])
        pairs = sig.args[0].dtype == types.int16
        fp8 = pairs and sig.args[3].dtype != types.int16 and _FP8_LOOKUP
        step = 4 * _LANES if fp8 else 2 * _LANES if pairs else _LANES
        words = ir.VectorType(ir.IntType(32), _LANES)
        if pairs:
            fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, words, words]), "llvm.x86.avx512bf16.dpbf16ps.512")
        acc = [cgutils.alloca_once(builder, vec) for _ in range(16)]
        full = builder.mul(builder.sdiv(d, i64(step)), i64(step))
        with cgutils.for_range_slice(builder, i64(0), n, i64(4)) as (t0, _):
            krow = [builder.add(builder.load(builder.gep(prow, [builder.add(t0, i64(j))])), h_off) for j in range(4)]
            for x in acc:
                builder.store(ir.Constant(vec, [0.0] * lanes), x)

            def dot(p, mask, keys):  # one step of `step` dims at p for the keys `keys`, the lanes outside mask (None: all in) as 0
                inside = mask if mask is not None else ir.Constant(ir.VectorType(ir.IntType(1), step), [1] * step)
                if fp8:  # 64 dims: two halves of 32 (_fp8_words), Q packed to match
                    kv = list(zip(*[_fp8_words(builder, sig.args[3].dtype, pk, builder.add(krow[j], p), inside) for j in keys]))
                elif pairs and sig.args[3].dtype == types.int16:
                    kv = [[builder.bitcast(masked(builder, "load", builder.gep(pk, [builder.add(krow[j], p)]), inside), words) for j in keys]]
                elif pairs:  # fp8 widened, then as bfloat16 (a float32's top half: exact), word i holding dims i and 16 + i
                    kv = [[]]
                    for j in keys:
                        lo, hi = (builder.bitcast(x, words) for x in _halves(builder, _kv_vector(builder, sig.args[3].dtype, pk, builder.add(krow[j], p), inside)))
                        kv[0].append(builder.or_(builder.lshr(lo, ir.Constant(words, [16] * _LANES)), builder.and_(hi, ir.Constant(words, [-65536] * _LANES))))
                else:  # `step` dims widened, in vectors of `lanes`
                    kv = list(zip(*[_pieces(builder, _kv_vector(builder, sig.args[3].dtype, pk, builder.add(krow[j], p), inside), lanes) for j in keys]))
                for part, kh in enumerate(kv):
                    qv = [builder.load(builder.bitcast(builder.gep(pq, [builder.add(builder.mul(i64(i), ldq), builder.add(p, i64((32 if pairs else lanes) * part)))]),
                                                       (words if pairs else vec).as_pointer()), align=4) for i in range(4)]
                    for i in range(4):
                        for j, k in zip(keys, kh):
                            old = builder.load(acc[4 * i + j])
                            builder.store(builder.call(fma, [old, qv[i], k] if pairs else [qv[i], k, old]), acc[4 * i + j])

            for keys in _QK_PASSES:
                with cgutils.for_range_slice(builder, i64(0), full, i64(step)) as (p, _):
                    dot(p, None, keys)
                with builder.if_then(builder.icmp_signed("<", full, d)):
                    dot(full, lanes_below(builder, builder.sub(d, full), step), keys)
            for j in range(4):
                with builder.if_then(builder.icmp_signed("<", builder.add(t0, i64(j)), n_ahead)):
                    at = builder.add(builder.load(builder.gep(pahead, [builder.add(t0, i64(j))])), ahead_off)
                    _prefetch_row(builder, builder.bitcast(builder.gep(pk, [at]), ir.IntType(8).as_pointer()),
                                  builder.mul(d, i64(sig.args[3].dtype.bitwidth // 8)))
            sums = [builder.load(x) for x in acc]
            width = lanes  # lanes of each accumulator's partial sums in the vectors of this stage
            while width > 1:
                half = width // 2
                chunks = range(0, lanes, width)
                lo = [c + x for c in chunks for x in range(half)]
                hi = [c + half + x for c in chunks for x in range(half)]
                lo, hi = (ir.Constant(ir.VectorType(ir.IntType(32), lanes), m + [lanes + i for i in m]) for m in (lo, hi))
                sums = [builder.fadd(builder.shuffle_vector(x, y, lo), builder.shuffle_vector(x, y, hi)) for x, y in zip(sums[0::2], sums[1::2])]
                width = half
            quad = ir.VectorType(f32, 4)
            for i in range(4):  # dot product 4i + j in lane (4i + j) % lanes of sums[(4i + j) // lanes]
                x = sums[4 * i // lanes]
                row = builder.shuffle_vector(x, x, ir.Constant(ir.VectorType(ir.IntType(32), 4), list(range(4 * i % lanes, 4 * i % lanes + 4))))
                builder.store(row, builder.bitcast(builder.gep(ps, [builder.add(builder.mul(i64(i), lds), t0)]), quad.as_pointer()), align=4)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _pv_block(typingctx, p, p_off, ldp, cache, rows, h_off, n, o, o_off, ldo, c0, dv, ahead, ahead_off, n_ahead):
    """O[i, c0:c0 + 64] += sum over t < n of P[i, t] V_t[c0:c0 + 64] for 4 query heads i, V_t read
    from the cache at element rows[t] + h_off and widened on the fly, columns >= dv as 0 (P: float32
    at p[p_off + i * ldp + t]; O: float32 rows at o[o_off + i * ldo], 64 columns writable, bfloat16
    V's in the order _v_column gives); each block of columns prefetches its own columns of the rows
    ahead[t] + ahead_off, t < n_ahead, on the way (on AVX2 the first of its 16-column blocks took
    whole rows, 4 lines per key into a loop of 8 FMAs a key, and stalled on them). 4 x 4
    accumulators; each V vector feeds four FMAs, each broadcast of P four. bfloat16 V widens in one
    step per 16 columns: a word of two holds an even column in its low half (shifted up) and an odd
    one in its high half (masked), so the columns of each 32 come out even ones first (two steps
    through vpmovzxwd). P in bfloat16 (int16, _pv_pairs: fp8 V): two keys per vdpbf16ps instead, P[i, t:t + 2]
    one broadcast word, the two V rows' bfloat16 words interleaved; an odd n's last key pairs with zeros.
    AVX2 (_DECODE_LANES 8): four blocks of 16 columns, 4 x 2 accumulators each, V widened by _kv_vector
    in column order; a block with dv's tail takes its own loop, as AVX2 has no masked loads of bytes or
    words (LLVM loads such a vector an element at a time behind a branch each: that and the spilled 4 x 4
    accumulators cost fp8 V ~2x, AMD EPYC Zen 3)."""
    sig = types.void(p, p_off, ldp, cache, rows, h_off, n, o, o_off, ldo, c0, dv, ahead, ahead_off, n_ahead)

    def codegen(context, builder, sig, args):
        pp, p_off, ldp, pv, prow, h_off, n, po, o_off, ldo, c0, dv, pahead, ahead_off, n_ahead = _args(context, builder, sig, args, (0, 3, 4, 7, 12))
        f32, i32, i64 = ir.FloatType(), ir.IntType(32), ir.IntType(64)
        lanes, dtype = _DECODE_LANES, sig.args[3].dtype
        vec = ir.VectorType(f32, lanes)
        words = ir.VectorType(i32, _LANES)
        bf16s = ir.VectorType(ir.IntType(16), 2 * _LANES)  # 32 bfloat16
        fma = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, vec, vec]), f"llvm.fma.v{lanes}f32")
        pairs = sig.args[0].dtype == types.int16  # P in bfloat16, V fp8 (_pv_pairs)
        if pairs:
            dot = cgutils.get_or_insert_function(builder.module, ir.FunctionType(vec, [vec, words, words]), "llvm.x86.avx512bf16.dpbf16ps.512")
        pp, po = builder.gep(pp, [p_off]), builder.gep(po, [builder.add(o_off, c0)])
        undef = ir.Constant(vec, ir.Undefined)
        splat_mask = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)

        def fp8_words(base, masks):  # _fp8_words of the 64 columns at base, each 16 masked by masks[v]
            return _fp8_words(builder, dtype, pv, base, _concat(builder, *(_concat(builder, masks[v], masks[v + 1]) for v in (0, 2))))

        def widen(base, masks):  # the columns of the V row at base as float32 vectors of `lanes`, each 16 masked by masks[v]
            if lanes < _LANES:  # AVX2: 16 columns
                return _pieces(builder, _kv_vector(builder, dtype, pv, base, masks[0]), lanes)
            if dtype == types.int16:
                vv = []
                for v in (0, 2):
                    w = builder.bitcast(masked(builder, "load", builder.gep(pv, [builder.add(base, i64(v * _LANES))]), _concat(builder, masks[v], masks[v + 1])), words)
                    vv += [builder.bitcast(x, vec) for x in (builder.shl(w, ir.Constant(words, [16] * _LANES)), builder.and_(w, ir.Constant(words, [-65536] * _LANES)))]
                return vv
            if _FP8_LOOKUP and dtype in (types.uint8, types.int8):
                return [builder.bitcast(x, vec) for w in fp8_words(base, masks)
                        for x in (builder.shl(w, ir.Constant(words, [16] * _LANES)), builder.and_(w, ir.Constant(words, [-65536] * _LANES)))]
            return [half for v in (0, 2) for half in _halves(builder, _kv_vector(builder, dtype, pv, builder.add(base, i64(v * _LANES)),
                                                                                   _concat(builder, masks[v], masks[v + 1])))]

        def interleave(x, y):  # words of x and y in pairs, as vpunpcklwd and vpunpckhwd do within each 128-bit lane: two <16 x i32>
            return [builder.bitcast(builder.shuffle_vector(x, y, ir.Constant(ir.VectorType(i32, 2 * _LANES), [k for lane in range(4) for j in range(4)
                                                                                                             for k in (8 * lane + 4 * hi + j, 2 * _LANES + 8 * lane + 4 * hi + j)])), words)
                    for hi in (0, 1)]

        def block(c, masks):  # O[:, c:c + 16 * len(masks)] += P V over the n keys
            o_ptr = [[builder.bitcast(builder.gep(po, [builder.add(builder.mul(i64(i), ldo), i64(c + v * lanes))]), vec.as_pointer())
                      for v in range(16 * len(masks) // lanes)] for i in range(4)]
            acc = [[cgutils.alloca_once_value(builder, builder.load(x, align=4)) for x in row] for row in o_ptr]

            def at(t):  # where this block's columns of key t's V row start
                return builder.add(builder.add(builder.add(builder.load(builder.gep(prow, [t])), h_off), c0), i64(c))

            def fetch_ahead(t):  # this block's columns of the row ahead of key t
                with builder.if_then(builder.icmp_signed("<", t, n_ahead)):
                    ahead = builder.add(builder.add(builder.add(builder.load(builder.gep(pahead, [t])), ahead_off), c0), i64(c))
                    _prefetch_row(builder, builder.bitcast(builder.gep(pv, [ahead]), ir.IntType(8).as_pointer()),
                                  i64(16 * len(masks) * dtype.bitwidth // 8))

            def pair(t, second):  # keys t and (second) t + 1, P[i, t:t + 2] one word of two bfloat16 (P[i, n] is 0, and key n's V zeros)
                first = [builder.bitcast(w, bf16s) for w in fp8_words(at(t), masks)]
                other = [builder.bitcast(w, bf16s) for w in fp8_words(at(builder.add(t, i64(1))), masks)] if second else [ir.Constant(bf16s, [0] * 2 * _LANES)] * 2
                vv = [x for u in (0, 1) for x in interleave(first[u], other[u])]
                fetch_ahead(t)
                if second:
                    fetch_ahead(builder.add(t, i64(1)))
                for i in range(4):
                    pi = builder.load(builder.bitcast(builder.gep(pp, [builder.add(builder.mul(i64(i), ldp), t)]), i32.as_pointer()), align=2)
                    splat = builder.shuffle_vector(builder.insert_element(ir.Constant(words, ir.Undefined), pi, i32(0)), ir.Constant(words, ir.Undefined),
                                                   ir.Constant(words, [0] * _LANES))
                    for v, x in enumerate(vv):
                        builder.store(builder.call(dot, [builder.load(acc[i][v]), splat, x]), acc[i][v])

            if pairs:
                with cgutils.for_range(builder, builder.sdiv(n, i64(2))) as loop:
                    pair(builder.mul(loop.index, i64(2)), True)
                with builder.if_then(builder.icmp_signed("!=", builder.srem(n, i64(2)), i64(0))):
                    pair(builder.sub(n, i64(1)), False)
            else:
                with cgutils.for_range(builder, n) as loop:
                    t = loop.index
                    vv = widen(at(t), masks)
                    fetch_ahead(t)
                    for i in range(4):
                        pi = builder.load(builder.gep(pp, [builder.add(builder.mul(i64(i), ldp), t)]))
                        splat = builder.shuffle_vector(builder.insert_element(undef, pi, ir.Constant(ir.IntType(32), 0)), undef, splat_mask)
                        for v, x in enumerate(vv):
                            builder.store(builder.call(fma, [splat, x, builder.load(acc[i][v])]), acc[i][v])
            for i in range(4):
                for v, x in enumerate(o_ptr[i]):
                    builder.store(builder.load(acc[i][v]), x, align=4)

        def left(c):  # columns c0 + c: of dv
            return builder.sub(dv, builder.add(c0, i64(c)))

        if lanes == _LANES:  # the 64 columns at once, masked loads for dv's tail
            block(0, [lanes_below(builder, left(v * _LANES), _LANES) for v in range(4)])
        else:  # blocks of 16 columns; a runtime mask would take a load per element (AVX2 masks 32-bit lanes only)
            all_in = ir.Constant(ir.VectorType(ir.IntType(1), 16), [1] * 16)
            for c in range(0, 64, 16):
                with builder.if_then(builder.icmp_signed(">", left(c), i64(0))):
                    with builder.if_else(builder.icmp_signed(">=", left(c), i64(16))) as (whole, tail):
                        with whole:
                            block(c, [all_in])
                        with tail:
                            block(c, [lanes_below(builder, left(c), 16)])
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _softmax_row(typingctx, s, s_off, n, scale, m, l, i):
    """One online-softmax step of a query head over n scores s[s_off:s_off + n]: scale them, move the
    running max m[i] to theirs, replace them by p = exp(score - max) (common.exp's arithmetic), and
    rescale the running sum l[i] and add theirs. s has room for n rounded up to 16: whole vectors are
    read and written, the lanes past n left out of max and sum (AVX2's masked stores, vmaskmovps, were
    slow on AMD EPYC Zen 3). Returns alpha, the factor the head's output accumulator is to be
    rescaled by. In 16 lanes: the Numba loops of this (scale, max, exp, sum
    passes over a 32-key row, vectorized in 8 lanes) took ~8 ns of ~50 per key and KV head, this ~4
    (bf16, 4 query heads per KV head, one core)."""
    sig = types.float32(s, s_off, n, scale, m, l, i)

    def codegen(context, builder, sig, args):
        ps, s_off, n, scale, pm, pl, i = _args(context, builder, sig, args, (0, 4, 5))
        i64, f32 = ir.IntType(64), ir.FloatType()
        vec = ir.VectorType(f32, _LANES)
        row = builder.gep(ps, [s_off])

        def splat(x):
            return builder.shuffle_vector(builder.insert_element(ir.Constant(vec, ir.Undefined), x, ir.Constant(ir.IntType(32), 0)),
                                          ir.Constant(vec, ir.Undefined), ir.Constant(ir.VectorType(ir.IntType(32), _LANES), [0] * _LANES))

        def larger(x, y):  # x > y ? x : y, a NaN x left out (as the Numba loop's comparison does)
            return builder.select(builder.fcmp_ordered(">", x, y, flags=IR_FLAGS), x, y)

        ninf, zero = ir.Constant(vec, [float("-inf")] * _LANES), ir.Constant(vec, [0.0] * _LANES)
        top = cgutils.alloca_once_value(builder, ninf)

        def at(j):
            return builder.bitcast(builder.gep(row, [j]), vec.as_pointer())

        with cgutils.for_range_slice(builder, i64(0), n, i64(_LANES)) as (j, _):
            mask = lanes_below(builder, builder.sub(n, j), _LANES)
            x = builder.fmul(builder.load(at(j), align=4), splat(scale), flags=IR_FLAGS)
            builder.store(x, at(j), align=4)
            builder.store(larger(builder.select(mask, x, ninf), builder.load(top)), top)
        m_ptr, l_ptr = builder.gep(pm, [i]), builder.gep(pl, [i])
        old = builder.load(m_ptr)
        new = _fold(builder, builder.load(top), larger)
        new = larger(new, old)
        seen = builder.fcmp_ordered(">", new, ir.Constant(f32, float("-inf")), flags=IR_FLAGS)
        # A head with only -inf scores so far keeps m = -inf and p = exp(-inf - 0) = 0.
        alpha = cgutils.alloca_once_value(builder, ir.Constant(f32, 1.0))
        with builder.if_then(builder.and_(seen, builder.fcmp_ordered("<", old, new, flags=IR_FLAGS))):  # the max grew (most chunks: not)
            builder.store(builder.extract_element(exp_lanes(builder, splat(builder.fsub(old, new, flags=IR_FLAGS))), ir.Constant(ir.IntType(32), 0)), alpha)
        alpha = builder.load(alpha)
        shift = splat(builder.select(seen, new, ir.Constant(f32, 0.0)))
        total = cgutils.alloca_once_value(builder, zero)
        with cgutils.for_range_slice(builder, i64(0), n, i64(_LANES)) as (j, _):
            mask = lanes_below(builder, builder.sub(n, j), _LANES)
            p = exp_lanes(builder, builder.fsub(builder.load(at(j), align=4), shift, flags=IR_FLAGS))
            builder.store(p, at(j), align=4)
            builder.store(builder.fadd(builder.load(total), builder.select(mask, p, zero), flags=IR_FLAGS), total)
        builder.store(new, m_ptr)
        total = _fold(builder, builder.load(total), lambda x, y: builder.fadd(x, y, flags=IR_FLAGS))
        builder.store(builder.fadd(builder.fmul(builder.load(l_ptr), alpha, flags=IR_FLAGS), total, flags=IR_FLAGS), l_ptr)
        return alpha

    return sig, codegen


@intrinsic
def _bf16_row(typingctx, s, s_off, n, dst):
    """dst[s_off:s_off + n] = s[s_off:s_off + n] (float32 softmax weights) rounded to bfloat16 (int16 bits,
    vcvtneps2bf16: subnormals as 0), and 0 on to n rounded up to 16 (a key t padding a pair t - 1, t of
    _pv_block weighs 0)."""
    sig = types.void(s, s_off, n, dst)

    def codegen(context, builder, sig, args):
        ps, s_off, n, pd = _args(context, builder, sig, args, (0, 3))
        i64 = ir.IntType(64)
        vec = ir.VectorType(ir.FloatType(), _LANES)
        cvt = cgutils.get_or_insert_function(builder.module, ir.FunctionType(ir.VectorType(BFloat(), _LANES), [vec]), "llvm.x86.avx512bf16.cvtneps2bf16.512")
        ps, pd = builder.gep(ps, [s_off]), builder.gep(pd, [s_off])
        with cgutils.for_range_slice(builder, i64(0), n, i64(_LANES)) as (j, _):
            x = builder.load(builder.bitcast(builder.gep(ps, [j]), vec.as_pointer()), align=4)
            x = builder.select(lanes_below(builder, builder.sub(n, j), _LANES), x, ir.Constant(vec, [0.0] * _LANES))
            bits = builder.bitcast(builder.call(cvt, [x]), ir.VectorType(ir.IntType(16), _LANES))
            builder.store(bits, builder.bitcast(builder.gep(pd, [j]), bits.type.as_pointer()), align=2)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _widen_paged(cache, table, b, h, j0, n, dst):
    """dst[j, :w] = float32(cache[block, slot, h, :]) for the keys j0 + j (j < n) of sequence b.
    Block and slot advance by counting: a division per row costs as much as widening it."""
    bs = cache.shape[1]
    i, slot = j0 // bs, j0 % bs
    for j in range(n):
        row, out = cache[table[b, i], slot, h], dst[j]
        for p in range(row.shape[0]):
            out[p] = load(row, p)
        i, slot = (i + 1, 0) if slot == bs - 1 else (i, slot + 1)


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _merge_head(part_m, part_l, part_o, t0, t1, h, v_scale, orow):
    """orow = head h of the partitions t0:t1 of one sequence combined: partial outputs part_o
    [parts, heads, dv] (unnormalized) with their running max part_m and sum part_l, times v_scale."""
    top = F32(-np.inf)
    for t in range(t0, t1):
        top = max(top, part_m[t, h])
    acc = np.zeros(orow.shape[0], np.float32)
    total = F32(0.0)
    for t in range(t0, t1):
        w = exp(part_m[t, h] - top) if part_m[t, h] > -np.inf else F32(0.0)
        total += part_l[t, h] * w
        for c in range(orow.shape[0]):
            acc[c] += part_o[t, h, c] * w
    inv = v_scale / total if total > 0 else F32(0.0)
    for c in range(orow.shape[0]):
        store(orow, c, acc[c] * inv)


@njit(**KERNEL)
def _merge_kernel(part_m, part_l, part_o, first, out, v_scale):
    """out[b, h] = the partitions first[b]:first[b + 1] of sequence b combined, for the sequences of
    more than one partition (the decode kernels write the others' outputs themselves)."""
    heads = out.shape[1]
    for bh in prange(out.shape[0] * heads):
        b, h = bh // heads, bh % heads
        if first[b + 1] - first[b] > 1:
            _merge_head(part_m, part_l, part_o, first[b], first[b + 1], h, v_scale, out[b, h])


@njit(cache=True)
def _partitions(seq_lens, size, workers):
    """(parts, first, order, bounds, keys): the (sequence, first key, end key) of each decode partition,
    first[b] = sequence b's first partition, the partitions dealt to `workers` threads (_balance), and
    the keys of all sequences. Long sequences split into equal shares of ~size keys so they spread
    over threads. Compiled: 5 us, against 57 us as NumPy calls (2 sequences, a machine at load ~5)."""
    first = np.zeros(len(seq_lens) + 1, np.int64)
    for b in range(len(seq_lens)):
        first[b + 1] = first[b] + max(1, -(-seq_lens[b] // size))
    parts = np.empty((first[-1], 3), np.int64)
    for b in range(len(seq_lens)):
        n, count = seq_lens[b], first[b + 1] - first[b]
        for i in range(count):
            parts[first[b] + i] = (b, i * n // count, (i + 1) * n // count)
    order, bounds = _balance(parts[:, 2] - parts[:, 1], workers)
    return parts, first, order, bounds, seq_lens.sum()


# ---------------------------------------------------------------- paged_decode_attention

_DECODE_PART = 1024  # keys per partition: a 16K sequence spreads over 16 tasks
_DECODE_CHUNK = 32  # keys per online-softmax step and per prefetch (16 as fast; 64 and more measured slower)
_DG = 4  # query heads per register block of both products (a KV head's group is padded to a multiple)


# Float32 lanes of the decode products' accumulators: AVX-512's 16 (sixteen 16-lane accumulators in 32
# registers), else AVX2's 8, whose 16 registers hold 8 accumulators and their operands: there _qk_chunk
# takes its 4 keys in two passes of 2 and _pv_block its 64 columns in four blocks of 16.
# AVX2 per core (AMD EPYC Zen 3, thread time, min of interleaved runs, ns per key and KV head, 1 x 1024 keys
# in L3 / 4 x 4096 from memory): prefetching one KV head ahead instead of one chunk, P V's prefetches spread
# over its blocks, the softmax without masked stores and with alpha's exp only where the max grew took bf16
# 52-54 / 73-88 -> 44-46 / 56-59 and fp8 e4m3fn 60-62 / 77-83 -> 57-58 / 61-65.
_DECODE_LANES = _LANES if "avx512f" in CPU_FEATURES else 8
_QK_PASSES = ((0, 1, 2, 3),) if _DECODE_LANES == _LANES else ((0, 1), (2, 3))
_BF16_DOT = "avx512bf16" in CPU_FEATURES
# How many KV heads ahead decode prefetches the K and V rows it will read (past the last head, into the next
# chunk), and into which cache (prefetch_line's locality: 3 L1, 2 L2). AVX-512, AMD EPYC Zen 4, one core,
# 4 x 4096 keys from memory, ns per key and KV head, bf16 / fp8 e4m3fn KV: into L1 one head ahead 65 / 39, two
# 66 / 30 (bf16: two heads' 16 KB in flight beside the computing one's 8 KB and its Q, score and output rows
# overflow the 32 KB L1); into L2 one head ahead 49 / 43, two 30 / 24, four 31 / 22, eight 34 / 26 (L2-warm:
# 24-25): L2 (1 MB) holds a distance that covers memory's latency, and the refill to L1 (~14 cycles) is
# hidden by the out-of-order window. AVX2 (AMD EPYC Zen 3) keeps one head ahead into L1 as tuned there.
_PREFETCH_AHEAD, _PREFETCH_LOCALITY = (2, 2) if _DECODE_LANES == _LANES else (1, 3)
_FP8_LOOKUP = "avx512vbmi" in CPU_FEATURES  # fp8 to bfloat16 by vpermi2b (_fp8_words), else through float16


def _query_tile(q, b, group, gp, qk_scale, kc):
    """(Q of sequence b as _qk_chunk takes it: [heads_kv, gp, padded d], zero-padded; the factor
    left to apply to the scores)."""


@overload(_query_tile, jit_options=HELPER)
def _query_tile_impl(q, b, group, gp, qk_scale, kc):
    pairs = _BF16_DOT and q.dtype == types.int16 and kc.dtype in (types.int16, types.uint8, types.int8)
    fp8 = pairs and kc.dtype != types.int16
    lookup = fp8 and _FP8_LOOKUP
    dtype, lanes = (np.int16, 4 * _LANES if lookup else 2 * _LANES) if pairs else (np.float32, _LANES)

    def tile(q, b, group, gp, qk_scale, kc):
        hq, d = q.shape[1], q.shape[2]
        qs = np.zeros((hq // group, gp, _round_up(d, lanes)), dtype)
        for h in range(hq):
            for p in range(d):
                if lookup:  # each 64 dims as _fp8_words orders them: the first 8 of each 16, then the others
                    e = p % 64
                    qs[h // group, h % group, p - e + e % 16 // 8 * 32 + e // 16 * 8 + e % 8] = q[b, h, p]
                elif fp8:  # word i of 32 dims holds dims i and 16 + i, as _qk_chunk packs fp8 K without _fp8_words
                    qs[h // group, h % group, p - p % 32 + 2 * (p % 16) + p % 32 // 16] = q[b, h, p]
                elif pairs:  # bfloat16 bits as they are, the scale applied to the scores
                    qs[h // group, h % group, p] = q[b, h, p]
                else:
                    qs[h // group, h % group, p] = load(q[b, h], p) * qk_scale
        return qs, qk_scale if pairs else F32(1.0)
    return tile


@njit(cache=True)
def _chunk_rows(cache, table, b, j0, n, rows):
    """rows[j] = the element offset of key j0 + j of sequence b (head 0) in the cache, for j < n;
    the rest of rows repeat the last (keys padding a 4 x 4 block). Block and slot advance by counting."""
    bs = cache.shape[1]
    sb, ss = cache.strides[0] // cache.itemsize, cache.strides[1] // cache.itemsize
    i, slot = j0 // bs, j0 % bs
    for j in range(n):
        rows[j] = table[b, i] * sb + slot * ss
        i, slot = (i + 1, 0) if slot == bs - 1 else (i, slot + 1)
    rows[n:] = rows[n - 1]


def _pv_pairs(q, vc):
    """Whether P V runs on vdpbf16ps (Numba array types of the query and the raw V cache): bfloat16 queries,
    so a bfloat16 output, whose own rounding is that of P to bfloat16 (2^-9), and an fp8 cache widened by
    table (_fp8_words). Two keys per instruction: their P as one word of two bfloat16, their V rows' words
    interleaved (vpunpcklwd / vpunpckhwd): half the FMAs of V widened to float32 (32 per key and KV head,
    group 4, d 128), which bound fp8 on AMD Zen 4's FMA pipes (two 256-bit halves per 512-bit FMA). One core,
    ns per key and KV head, L2-warm / 8 x 4096 keys from memory: fp8 e4m3fn 28.6 / 29.1 -> 24.4 / 25.4.
    bfloat16 V took it too, 25.4 -> 23.5 L2-warm but 28.1 -> 32.1 from memory, so it widens as before."""
    return _BF16_DOT and _FP8_LOOKUP and _DECODE_LANES == _LANES and q.dtype == types.int16 and vc.dtype in (types.uint8, types.int8)


def _pv_weights(q, vc, s, group, n, pb):
    """P as _pv_block takes it: s (float32 [gp, chunk]), or where _pv_pairs its first `group` rows' n
    weights in bfloat16 into pb (int16, like s, rows past `group` zero)."""


@overload(_pv_weights, jit_options=HELPER)
def _pv_weights_impl(q, vc, s, group, n, pb):
    if not _pv_pairs(q, vc):
        return lambda q, vc, s, group, n, pb: s

    def rounded(q, vc, s, group, n, pb):
        for g in range(group):
            _bf16_row(s, g * s.shape[1], n, pb)
        return pb
    return rounded


def _v_column(q, vc, c):
    """Where _pv_block keeps output column c: for bfloat16 V on AVX-512, each 32 columns' even ones first;
    by vdpbf16ps (_pv_pairs) _fp8_words' words of 128-bit lanes taken in fours by vpunpck*wd."""


@overload(_v_column, jit_options=HELPER)
def _v_column_impl(q, vc, c):
    if _pv_pairs(q, vc):  # column 16k + 8u + 4x + j of each 64 (_fp8_words' half u): lane 4k + j of vector 2u + x
        return lambda q, vc, c: c - c % 64 + c % 16 // 8 * 32 + c % 8 // 4 * 16 + c % 64 // 16 * 4 + c % 4
    if vc.dtype == types.int16 and _DECODE_LANES == _LANES:
        return lambda q, vc, c: c - c % 32 + c % 2 * 16 + c % 32 // 2
    if _FP8_LOOKUP and vc.dtype in (types.uint8, types.int8):  # word w of _fp8_words' halves, then even / odd as bfloat16
        def fp8(q, vc, c):
            e = c % 64
            w = e // 16 * 8 + e % 8
            return c - e + e % 16 // 8 * 32 + w % 2 * 16 + w // 2
        return fp8
    return lambda q, vc, c: c


@njit(cache=True, fastmath=FASTMATH, error_model="numpy")
def _paged_task(q, kc, vc, table, part, qk_scale, softcap, m_out, l_out, o_out):
    """One partition (sequence b, keys j0:j1) for every query head, unnormalized into m_out, l_out
    [heads_q] and o_out [heads_q, dv].

    Chunk by chunk, every KV head in turn: the scores of its group of query heads in 4 x 4 blocks
    straight from the cache rows (GQA: K and V are read once for all of them), the online softmax,
    then P V in 4 heads x 64 columns, V widened in registers as well; nothing is staged in float32.
    The next chunk's rows are prefetched while this one computes."""
    b, j0, j1 = part
    hq, d = q.shape[1], q.shape[2]
    hkv, dv = kc.shape[2], vc.shape[3]
    group = hq // hkv
    gp, dvp = _round_up(group, _DG), _round_up(dv, _NR)
    # Padding is zeros: heads with q = 0 (results unused), dims that add nothing.
    qs, score_scale = _query_tile(q, b, group, gp, qk_scale, kc)
    dp = qs.shape[2]
    o = np.zeros((hkv, gp, dvp), np.float32)
    m = np.full((hkv, gp), -np.inf, np.float32)
    l = np.zeros((hkv, gp), np.float32)
    s = np.empty((gp, _DECODE_CHUNK), np.float32)
    pb = np.zeros((gp, _DECODE_CHUNK), np.int16)
    # rows of this chunk (k_rows[0], v_rows[0]) and the next ([1]). While a KV head computes, the rows of
    # the head _PREFETCH_AHEAD on are prefetched (past the last head, the next chunk's): with them in flight,
    # the kernel streams ~20% faster (L1, one head ahead) to 2x (AVX-512: L2, two heads ahead). Into L1 one
    # chunk ahead (128 KB later, bf16, d 128, 8 KV heads) they had left L1 and P V stalled on its V loads.
    # They are spread over the work (K rows 4 at a time between score blocks, V rows by each block of
    # P V columns): issued all at once at the chunk's start, 2048 prefetches (bf16, 8 KV heads, d 128)
    # filled the line fill buffers and stalled the compute behind them, 10-20% slower.
    k_rows, v_rows = np.empty((2, _DECODE_CHUNK), np.int64), np.empty((2, _DECODE_CHUNK), np.int64)
    k_head, v_head = kc.strides[2] // kc.itemsize, vc.strides[2] // vc.itemsize
    _chunk_rows(kc, table, b, j0, min(_DECODE_CHUNK, j1 - j0), k_rows[1])
    _chunk_rows(vc, table, b, j0, min(_DECODE_CHUNK, j1 - j0), v_rows[1])
    for c0 in range(j0, j1, _DECODE_CHUNK):
        n = min(_DECODE_CHUNK, j1 - c0)
        k_rows[0], v_rows[0] = k_rows[1], v_rows[1]
        n_next = min(_DECODE_CHUNK, j1 - c0 - n)
        if n_next > 0:
            _chunk_rows(kc, table, b, c0 + n, n_next, k_rows[1])
            _chunk_rows(vc, table, b, c0 + n, n_next, v_rows[1])
        for kvh in range(hkv):
            # prefetched meanwhile: the rows of the KV head _PREFETCH_AHEAD on, past the last in the next chunk
            last = kvh + _PREFETCH_AHEAD >= hkv
            k_next, v_next, n_ahead = (k_rows[1], v_rows[1], n_next) if last else (k_rows[0], v_rows[0], n)
            h_next = (kvh + _PREFETCH_AHEAD) % hkv
            for g0 in range(0, gp, _DG):
                _qk_chunk(qs[kvh], g0 * dp, dp, kc, k_rows[0], kvh * k_head, n, s, g0 * _DECODE_CHUNK, _DECODE_CHUNK, d,
                          k_next, h_next * k_head, n_ahead if g0 == 0 else 0)
            scaled = _softcap(s[:group, :n].T, n, group, score_scale, softcap)
            for g in range(group):
                alpha = _softmax_row(s, g * _DECODE_CHUNK, n, scaled, m[kvh], l[kvh], g)
                if alpha != 1:  # the running max grew
                    orow = o[kvh, g]
                    for c in range(dvp):
                        orow[c] *= alpha
            p = _pv_weights(q, vc, s, group, n, pb)
            for g0 in range(0, gp, _DG):
                for c in range(0, dvp, _NR):
                    _pv_block(p, g0 * _DECODE_CHUNK, _DECODE_CHUNK, vc, v_rows[0], kvh * v_head, n, o[kvh], g0 * dvp, dvp, c, dv,
                              v_next, h_next * v_head, n_ahead if g0 == 0 else 0)
    for h in range(hq):
        m_out[h] = m[h // group, h % group]
        l_out[h] = l[h // group, h % group]
        for c in range(dv):
            o_out[h, c] = o[h // group, h % group, _v_column(q, vc, c)]


@njit(**KERNEL)
def _paged_kernel(q, kc, vc, table, parts, first, order, bounds, qk_scale, softcap, v_scale, part_m, part_l, part_o, out):
    """Thread w runs the partitions order[bounds[w]:bounds[w + 1]]; a sequence of one partition
    goes straight to out, the others to part_m, part_l, part_o for _merge_kernel."""
    for w in prange(bounds.shape[0] - 1):
        for i in range(bounds[w], bounds[w + 1]):
            t = order[i]
            b = parts[t, 0]
            _paged_task(q, kc, vc, table, parts[t], qk_scale, softcap, part_m[t], part_l[t], part_o[t])
            if first[b + 1] - first[b] == 1:
                for h in range(out.shape[1]):
                    _merge_head(part_m, part_l, part_o, t, t + 1, h, v_scale, out[b, h])


# A decode call reading under this many bytes of K and V runs on one thread (common.sized's serial
# build). Alone, two threads pay from ~55 us of serial time (waking them costs 25-30 us; serial: 29 us
# for 256 KiB, 54 us for 512 KiB, bfloat16, d 64, 7 query heads per KV head). Inside a torch model they
# pay far later: torch's OpenMP threads spin after each matmul on the core the second thread needs. A
# 4-layer Llama (16/4 heads, d 64, 512-544 keys: 1.1 MiB of float32 K and V) decoded 32 tokens at 0.87x
# stock with this at 512 KiB and 0.95x at 1 GiB (quiet machine); 2 MiB keeps such models on one thread.
_DECODE_SERIAL_BYTES = 8 * SERIAL_BYTES


def paged_decode_attention(outs, q, k_cache, v_cache, block_table, seq_lens, scale, softcap, k_scale, v_scale):
    """One query token per sequence against a paged KV cache (q's dtype or fp8 with scales)."""
    (out,) = outs
    if out.size == 0:
        return
    hq = q.shape[1]
    scale = _default_scale(q) if scale is None else scale
    kc, k_factor = _kv_operand(k_cache)
    vc, v_factor = _kv_operand(v_cache)
    k_scale = k_factor * (1.0 if k_scale is None else k_scale)
    v_scale = v_factor * (1.0 if v_scale is None else v_scale)
    parts, first, order, bounds, keys = _partitions(seq_lens, _DECODE_PART, numba.config.NUMBA_NUM_THREADS)  # not get_num_threads(): 2-30 us a call
    part_m = np.empty((len(parts), hq), np.float32)
    part_l = np.empty((len(parts), hq), np.float32)
    part_o = np.empty((len(parts), hq, v_cache.shape[-1]), np.float32)
    nbytes = keys * kc.shape[2] * (kc.shape[3] * kc.itemsize + vc.shape[3] * vc.itemsize)
    out = raw_view(out)
    kernel = sized(_paged_kernel, nbytes, _DECODE_SERIAL_BYTES)
    kernel(raw_view(q), kc, vc, block_table, parts, first, order, bounds, F32(scale * k_scale), F32(softcap or 0.0), F32(v_scale),
           part_m, part_l, part_o, out)
    if len(parts) > len(seq_lens):
        sized(_merge_kernel, part_o.nbytes)(part_m, part_l, part_o, first, out, F32(v_scale))


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
def _mla_kernel(q_nope, q_pe, latent, k_pe, table, parts, first, order, bounds, scale, part_m, part_l, part_o, out):
    """_paged_kernel with _mla_task."""
    for w in prange(bounds.shape[0] - 1):
        for i in range(bounds[w], bounds[w + 1]):
            t = order[i]
            b = parts[t, 0]
            _mla_task(q_nope, q_pe, latent, k_pe, table, parts[t], scale, part_m[t], part_l[t], part_o[t])
            if first[b + 1] - first[b] == 1:
                for h in range(out.shape[1]):
                    _merge_head(part_m, part_l, part_o, t, t + 1, h, F32(1.0), out[b, h])


def mla_decode(outs, q_nope, q_pe, kv_latent, k_pe, block_table, seq_lens, scale):
    """DeepSeek MLA decode, absorbed form: scores q_nope . c + q_pe . k_pe, values c."""
    (out,) = outs
    if out.size == 0:
        return
    heads, dl = q_nope.shape[1:]
    parts, first, order, bounds, _ = _partitions(seq_lens, _MLA_PART, numba.get_num_threads())
    part_m = np.empty((len(parts), heads), np.float32)
    part_l = np.empty((len(parts), heads), np.float32)
    part_o = np.empty((len(parts), heads, dl), np.float32)
    out = raw_view(out)
    # Compute-bound (128 heads share each key): even a short context outweighs waking the threads.
    _mla_kernel(raw_view(q_nope), raw_view(q_pe), raw_view(kv_latent), raw_view(k_pe), block_table, parts, first, order, bounds, F32(scale),
                part_m, part_l, part_o, out)
    if len(parts) > len(seq_lens):
        sized(_merge_kernel, part_o.nbytes)(part_m, part_l, part_o, first, out, F32(1.0))


KERNELS = (Kernel("attention", attention, options={"contiguous": False}), Kernel("paged_decode_attention", paged_decode_attention), Kernel("mla_decode", mla_decode))
