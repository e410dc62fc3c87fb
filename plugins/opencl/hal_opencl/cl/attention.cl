/* attention: tiled over keys with an online softmax (flash-attention style), never materializing
   the [seq_q, seq_k] scores.

   Dense and varlen calls are one kernel: q [tokens_q, heads_q, d], k [tokens_k, heads_kv, d],
   v [tokens_k, heads_kv, dv] and out [tokens_q, heads_q, dv] with sequence offsets cu_q / cu_k
   (a dense [batch, seq, ...] call is the varlen call with equal lengths).

   Grid: dim 0 = query blocks of BQ rows (one work-item per query row, BQ = work-group size = 32),
   dim 1 = query head, dim 2 = sequence. A work-item keeps its q row and its output accumulator
   in private memory (D_MAX and DV_MAX floats: the head dims rounded up to a bucket, so one build
   serves d = 59, 64, ...). The group walks the keys visible to any of its rows in tiles of BK keys:
   all BQ work-items stage the tile's K [BK, d] and V [BK, dv] rows in local memory (the launcher
   passes the buffers; at most 32 KiB together), a barrier, each work-item scores its row against
   the tile, rescales its accumulator once per tile (running max m, running sum l), and a barrier
   before the next tile is staged. Key tiles that no row of the block can see (causal, window)
   are never loaded; the loop bounds depend only on the group, so every work-item reaches the
   same barriers. Masking follows hal: causal aligned bottom-right (query i sits at key position
   i + seq_k - seq_q), window W keeps |position - key| < W (only keys behind with causal), softcap
   c maps s to c tanh(s / c), and a row that sees no key writes zeros.

   Build options: X_KIND (q, k, v, out), D_MAX, DV_MAX, BK. Attributes window = 0 and softcap = 0
   mean none.
*/
#define BQ 32

/* The running max, NaN-propagating (fmax drops a NaN): a NaN score makes its row NaN, as the reference. */
inline float max_nan(float a, float b) { return (a != a || a > b) ? a : b; }

__kernel __attribute__((reqd_work_group_size(BQ, 1, 1)))
void attention(__global const TYPE(X_KIND) *q, __global const TYPE(X_KIND) *k, __global const TYPE(X_KIND) *v,
               __global const int *cu_q, __global const int *cu_k, __global TYPE(X_KIND) *out, const int hq,
               const int hkv, const int d, const int dv, const float scale, const int causal, const int window,
               const float softcap, __local float *ks, __local float *vs) {
    const int lid = get_local_id(0), h = get_group_id(1), seq = get_group_id(2);
    const int q0 = cu_q[seq], sq = cu_q[seq + 1] - q0;
    const int k0 = cu_k[seq], sk = cu_k[seq + 1] - k0;
    const int qb = get_group_id(0) * BQ;
    if (qb >= sq) return; /* uniform over the group: no barrier is skipped by only some work-items */
    const int row = qb + lid, active = row < sq;
    const int kvh = h / (hq / hkv), shift = sk - sq;
    const int pos = row + shift, last = min(qb + BQ, sq) - 1 + shift;

    /* keys [lo, hi) visible to some row of this block */
    int lo = 0, hi = sk;
    if (causal) hi = min(hi, last + 1);
    if (window > 0) {
        lo = max(lo, qb + shift - window + 1);
        if (!causal) hi = min(hi, last + window);
    }

    float qr[D_MAX], acc[DV_MAX], sc[BK];
    for (int i = 0; i < d; i++) qr[i] = active ? LOAD(X_KIND, q, ((size_t)(q0 + row) * hq + h) * d + i) : 0.0f;
    for (int i = 0; i < dv; i++) acc[i] = 0.0f;
    float m = -INFINITY, l = 0.0f;

    for (int t0 = lo; t0 < hi; t0 += BK) {
        const int nk = min(BK, hi - t0);
        barrier(CLK_LOCAL_MEM_FENCE); /* the previous tile is no longer read */
        for (int e = lid; e < nk * d; e += BQ) {
            const int j = e / d;
            ks[e] = LOAD(X_KIND, k, ((size_t)(k0 + t0 + j) * hkv + kvh) * d + (e - j * d));
        }
        for (int e = lid; e < nk * dv; e += BQ) {
            const int j = e / dv;
            vs[e] = LOAD(X_KIND, v, ((size_t)(k0 + t0 + j) * hkv + kvh) * dv + (e - j * dv));
        }
        barrier(CLK_LOCAL_MEM_FENCE);
        if (!active) continue;

        float tmax = -INFINITY;
        for (int j = 0; j < nk; j++) {
            const int key = t0 + j;
            int ok = 1;
            if (causal) ok = key <= pos;
            if (window > 0) ok = ok && pos - key < window && (causal || key - pos < window);
            float s = -INFINITY;
            if (ok) {
                /* Compensated dot product (Ogita, Rump and Oishi's Dot2: the exact error of each product
                   from an fma, of each sum from TwoSum), as accurate as a double-precision dot rounded
                   to fp32, with fp32 operations only (no cl_khr_fp64 needed). A plain fp32 dot is as
                   accurate as the naive fp32 computation hal's conformance rule compares against; with
                   V ~ 1000 and cancelling outputs that lands above twice the naive error for a few
                   percent of random inputs. Dot2 costs about 3x the plain dot on the score part. */
                float hi = 0.0f, lo = 0.0f;
                __local const float *kj = ks + j * d;
                for (int i = 0; i < d; i++) {
                    const float p = qr[i] * kj[i], ep = fma(qr[i], kj[i], -p);
                    const float t = hi + p, z = t - hi;
                    lo += (hi - (t - z)) + (p - z) + ep;
                    hi = t;
                }
                s = (isinf(hi) ? hi : hi + lo) * scale; /* an infinite product leaves lo NaN (inf - inf) */
                if (softcap > 0.0f) s = softcap * tanh(s / softcap);
                tmax = max_nan(tmax, s);
            }
            sc[j] = s;
        }
        if (tmax == -INFINITY) continue; /* nothing visible in this tile for this row */
        const float mn = max_nan(m, tmax), corr = exp(m - mn); /* exp(-inf) = 0 on the first visible tile */
        l *= corr;
        for (int i = 0; i < dv; i++) acc[i] *= corr;
        for (int j = 0; j < nk; j++) {
            if (sc[j] == -INFINITY) continue;
            const float p = exp(sc[j] - mn);
            l += p;
            for (int i = 0; i < dv; i++) acc[i] = fma(p, vs[j * dv + i], acc[i]);
        }
        m = mn;
    }

    if (!active) return;
    /* divide (one rounding) rather than multiply by 1 / l (two); l == 0: no visible key, l NaN: a NaN score */
    for (int i = 0; i < dv; i++) STORE(X_KIND, out, ((size_t)(q0 + row) * hq + h) * dv + i, l == 0.0f ? 0.0f : acc[i] / l);
}
