// Vendor file: the split-K decode is sized for 32-lane warps (lane groups of a warp share a token,
// 8-element chunks per lane) and merges partials with 32-bit-mask shuffles.
// Decode attention over paged KV caches, split-K: paged_decode_partition<T, C>, mla_decode_partition<T>
// and their shared merge decode_merge<T>. Semantics in ops/attention.py; ABI in docs/gpu-kernels.md.
//
// Split-K: block (p, h, b) handles tokens [p * partition_size, min((p + 1) * partition_size,
// seq_lens[b])) of head h of sequence b and writes its unnormalized fp32 accumulator, running max
// and running sum to partial_out / partial_max / partial_sum [b][h][p]; partitions past the end of a
// sequence write nothing. decode_merge rescales the partitions a sequence has into the output. A
// 16384-token sequence thus spreads over 32 blocks per head instead of serializing on one.
//
// Inside a partition (128 threads = 4 warps), one pass over the tokens with an online softmax:
//   - a token is served by a group of G lanes (G a power of two, G >= (chunks of 8 elements) / 2,
//     at most 32), so a warp scores 32 / G tokens at once and the block 128 / G: more independent
//     loads in flight per SM for small head dims (d = 64: G = 4, 32 tokens per block step);
//   - lane `sub` of a group owns the 8-element chunks sub, sub + G, ... (<= 4 chunks: head dims up
//     to 512; MLA: 3 chunks, 768) of q (kept in registers for the whole partition), of the key row and of the value
//     row: 16-byte loads of K and V (8 bytes for fp8) when the rows are aligned, issued together
//     before any reduction; the dot product is reduced across the group with xor shuffles;
//   - each group keeps its own running max, sum and accumulator (its chunks of the value row);
//     groups are merged with shuffles at the end, the 4 warps through shared memory.
// For MLA the value is the latent row itself: the chunks a lane loaded for the score are reused as
// the value chunks (chunk i of the key is chunk i of the value), so every latent row is read once.
// (The ABI has one block per head, so a latent row is still read once per head of the batch row;
// serving all heads of a sequence from one block, as FlashMLA does, would need a different grid.)
#include "hal_gpu.h"

#define DECODE_THREADS 128
#define DECODE_WARPS 4
// 8-element chunks per lane (registers for q, key, value and accumulator chunks scale with it):
// paged decode 2 (head dims up to 32 * 2 * 8 = 512), MLA 3 (latent + rope up to 768; its value
// chunks are its key chunks). Four for paged decode would spill the fp8 variants on sm_80.
#define DECODE_CHUNKS_PAGED 2
#define DECODE_CHUNKS_MLA 3

struct DecodeOut {
    float* partial_out;
    float* partial_max;
    float* partial_sum;
};

// One partition of one (head, sequence). Key of token t: [k1 row (d1) | k2 row (d2)] (d2 = 0 for
// paged decode); value: v row (dv), or for MLA (value_is_k1) the k1 row itself.
template <typename T, typename C, bool value_is_k1, int CH>
__device__ __forceinline__ void decode_partition(const T* q1, int d1, const T* q2, int d2, const C* k1, long long k1_rs, const C* k2, long long k2_rs,
                                                 const C* vb, long long v_rs, int dv, const int* table_row, int block_size, int start, int end,
                                                 float logit_scale, float softcap, float v_scale, int kv_format, DecodeOut o, long long slot) {
    __shared__ float red[DECODE_WARPS][32 * CH * 8];
    __shared__ float warp_m[DECODE_WARPS], warp_l[DECODE_WARPS];

    const int nc1 = (d1 + 7) / 8, nck = nc1 + (d2 + 7) / 8, ncv = (dv + 7) / 8;
    const int most = max(nck, ncv);
    int G = 1;
    while (G < 32 && 2 * G < most) G <<= 1;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int sub = lane & (G - 1), gi = lane / G, per_warp = 32 / G;

    // The query chunks of this lane, in fp32 registers.
    float qr[CH][8];
    const bool q1_vec = chunks_aligned(q1, d1), q2_vec = d2 > 0 && chunks_aligned(q2, d2);
#pragma unroll
    for (int i = 0; i < CH; ++i) {
        const int c = sub + G * i;
        if (c < nc1) load8_float(q1 + 8 * c, min(8, d1 - 8 * c), q1_vec, 0, qr[i]);
        else if (c < nck) load8_float(q2 + 8 * (c - nc1), min(8, d2 - 8 * (c - nc1)), q2_vec, 0, qr[i]);
        else
#pragma unroll
            for (int e = 0; e < 8; ++e) qr[i][e] = 0.0f;
    }
    const bool k1_vec = chunks_aligned(k1, (int)k1_rs) && d1 % 8 == 0;
    const bool k2_vec = d2 > 0 && chunks_aligned(k2, (int)k2_rs) && d2 % 8 == 0;
    const bool v_vec = !value_is_k1 && chunks_aligned(vb, (int)v_rs) && dv % 8 == 0;

    float m = -INFINITY, l = 0.0f;
    float acc[CH][8];
#pragma unroll
    for (int i = 0; i < CH; ++i)
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[i][e] = 0.0f;

    for (int t0 = start; t0 < end; t0 += DECODE_WARPS * per_warp) {  // uniform over the block
        const int tok = t0 + warp * per_warp + gi;
        const bool valid = tok < end;
        long long row = 0;
        if (valid) row = (long long)table_row[tok / block_size] * block_size + tok % block_size;
        float kv[CH][8], vv[CH][8];
        // Issue every load of the token (key and value chunks) before using any of them.
#pragma unroll
        for (int i = 0; i < CH; ++i) {
            const int c = sub + G * i;
            if (valid && c < nc1) load8_float(k1 + row * k1_rs + 8 * c, min(8, d1 - 8 * c), k1_vec, kv_format, kv[i]);
            else if (valid && c < nck) load8_float(k2 + row * k2_rs + 8 * (c - nc1), min(8, d2 - 8 * (c - nc1)), k2_vec, kv_format, kv[i]);
            else
    #pragma unroll
            for (int e = 0; e < 8; ++e) kv[i][e] = 0.0f;
            if (!value_is_k1) {
                if (valid && c < ncv) load8_float(vb + row * v_rs + 8 * c, min(8, dv - 8 * c), v_vec, kv_format, vv[i]);
                else
        #pragma unroll
            for (int e = 0; e < 8; ++e) vv[i][e] = 0.0f;
            }
        }
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < CH; ++i)
#pragma unroll
            for (int e = 0; e < 8; ++e) dot += qr[i][e] * kv[i][e];
        for (int off = G / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);  // within the group
        if (valid) {
            float s = dot * logit_scale;
            if (softcap > 0.0f) s = softcap * tanhf(s / softcap);
            const float m_new = fmaxf(m, s);
            const float alpha = expf(m - m_new), p = expf(s - m_new);  // m = -inf at the first token: alpha = 0
            l = l * alpha + p;
            m = m_new;
#pragma unroll
            for (int i = 0; i < CH; ++i)
    #pragma unroll
            for (int e = 0; e < 8; ++e) acc[i][e] = acc[i][e] * alpha + p * (value_is_k1 ? kv[i][e] : vv[i][e]);
        }
    }

    // Merge the groups of a warp (lanes sub + G * gi own the same columns for every gi).
    for (int off = G; off < 32; off <<= 1) {
        const float m_o = __shfl_xor_sync(0xffffffffu, m, off), l_o = __shfl_xor_sync(0xffffffffu, l, off);
        const float m_new = fmaxf(m, m_o);
        const float m_use = m_new == -INFINITY ? 0.0f : m_new;
        const float f = expf(m - m_use), f_o = expf(m_o - m_use);
        l = l * f + l_o * f_o;
#pragma unroll
        for (int i = 0; i < CH; ++i)
#pragma unroll
            for (int e = 0; e < 8; ++e) acc[i][e] = acc[i][e] * f + __shfl_xor_sync(0xffffffffu, acc[i][e], off) * f_o;
        m = m_new;
    }
    // Merge the warps through shared memory: lanes 0..G-1 of each warp hold its result.
    if (gi == 0) {
#pragma unroll
        for (int i = 0; i < CH; ++i) {
            const int c = sub + G * i;
            if (c < ncv)
    #pragma unroll
            for (int e = 0; e < 8; ++e) red[warp][8 * c + e] = acc[i][e];
        }
        if (sub == 0) {
            warp_m[warp] = m;
            warp_l[warp] = l;
        }
    }
    __syncthreads();
    float big = -INFINITY;
    for (int w = 0; w < DECODE_WARPS; ++w) big = fmaxf(big, warp_m[w]);  // finite: the partition has a token
    float f[DECODE_WARPS], total = 0.0f;
    for (int w = 0; w < DECODE_WARPS; ++w) {
        f[w] = warp_m[w] == -INFINITY ? 0.0f : expf(warp_m[w] - big);  // a warp that had no token
        total += f[w] * warp_l[w];
    }
    for (int c = threadIdx.x; c < dv; c += DECODE_THREADS) {
        float sum = 0.0f;
        for (int w = 0; w < DECODE_WARPS; ++w) sum += f[w] == 0.0f ? 0.0f : f[w] * red[w][c];
        o.partial_out[slot * dv + c] = sum * v_scale;  // v_scale is linear: applied once here
    }
    if (threadIdx.x == 0) {
        o.partial_max[slot] = big;
        o.partial_sum[slot] = total;
    }
}

// grid (max_partitions, heads_q, batch), block 128. C = T (kv_format 0) or unsigned char fp8 (1 e4m3fn, 2 e4m3fnuz).
template <typename T, typename C>
__global__ void __launch_bounds__(DECODE_THREADS)
paged_decode_partition(const T* __restrict__ q, const C* __restrict__ k_cache, const C* __restrict__ v_cache, const int* __restrict__ block_table,
                       const int* __restrict__ seq_lens, float* __restrict__ partial_out, float* __restrict__ partial_max,
                       float* __restrict__ partial_sum, int batch, int heads_q, int heads_kv, int head_dim, int head_dim_v, int block_size,
                       int max_blocks, int partition_size, int max_partitions, float scale, float softcap, float k_scale, float v_scale,
                       int kv_format) {
    const int p = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    if (b >= batch || p >= max_partitions) return;
    const int len = seq_lens[b], start = p * partition_size;
    if (start >= len) return;  // past the sequence: the merge does not read this slot
    const int end = min(start + partition_size, len);
    const int hk = h / (heads_q / heads_kv);
    const DecodeOut o{partial_out, partial_max, partial_sum};
    const long long slot = ((long long)b * heads_q + h) * max_partitions + p;
    if (max(head_dim, head_dim_v) > 32 * DECODE_CHUNKS_PAGED * 8) {  // unsupported: make the output NaN, never silently wrong
        if (threadIdx.x == 0) partial_max[slot] = partial_sum[slot] = 0.0f * INFINITY;
        return;
    }
    decode_partition<T, C, false, DECODE_CHUNKS_PAGED>(q + ((long long)b * heads_q + h) * head_dim, head_dim, q, 0, k_cache + (long long)hk * head_dim,
                                  (long long)heads_kv * head_dim, k_cache, 0, v_cache + (long long)hk * head_dim_v, (long long)heads_kv * head_dim_v,
                                  head_dim_v, block_table + (long long)b * max_blocks, block_size, start, end, scale * k_scale, softcap, v_scale,
                                  kv_format, o, ((long long)b * heads_q + h) * max_partitions + p);
}

// grid (max_partitions, heads, batch), block 128. Key = [kv_latent row | k_pe row], value = kv_latent row.
template <typename T>
__global__ void __launch_bounds__(DECODE_THREADS)
mla_decode_partition(const T* __restrict__ q_nope, const T* __restrict__ q_pe, const T* __restrict__ kv_latent, const T* __restrict__ k_pe,
                     const int* __restrict__ block_table, const int* __restrict__ seq_lens, float* __restrict__ partial_out,
                     float* __restrict__ partial_max, float* __restrict__ partial_sum, int batch, int heads, int latent, int rope, int block_size,
                     int max_blocks, int partition_size, int max_partitions, float scale) {
    const int p = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    if (b >= batch || p >= max_partitions) return;
    const int len = seq_lens[b], start = p * partition_size;
    if (start >= len) return;
    const int end = min(start + partition_size, len);
    const DecodeOut o{partial_out, partial_max, partial_sum};
    const long long bh = (long long)b * heads + h;
    if ((latent + 7) / 8 + (rope + 7) / 8 > 32 * DECODE_CHUNKS_MLA) {  // unsupported: NaN output, never silently wrong
        if (threadIdx.x == 0) partial_max[bh * max_partitions + p] = partial_sum[bh * max_partitions + p] = 0.0f * INFINITY;
        return;
    }
    decode_partition<T, T, true, DECODE_CHUNKS_MLA>(q_nope + bh * latent, latent, q_pe + bh * rope, rope, kv_latent, latent, k_pe, rope, kv_latent, latent, latent,
                                 block_table + (long long)b * max_blocks, block_size, start, end, scale, 0.0f, 1.0f, 0, o,
                                 bh * max_partitions + p);
}

// grid (heads, batch), block 128: out[b][h][:] = sum_p e^(m_p - M) o_p / sum_p e^(m_p - M) l_p over the
// partitions sequence b has (ceil(seq_lens[b] / partition_size)).
template <typename T>
__global__ void __launch_bounds__(DECODE_THREADS)
decode_merge(const float* __restrict__ partial_out, const float* __restrict__ partial_max, const float* __restrict__ partial_sum, T* __restrict__ out,
             int batch, int heads, int head_dim_v, int max_partitions, const int* __restrict__ seq_lens, int partition_size) {
    const int h = blockIdx.x, b = blockIdx.y;
    if (b >= batch || h >= heads) return;
    const long long bh = (long long)b * heads + h;
    const int len = seq_lens[b];
    const int parts = len > 0 ? min(max_partitions, (len + partition_size - 1) / partition_size) : 0;
    const float* pm = partial_max + bh * max_partitions;
    const float* ps = partial_sum + bh * max_partitions;
    float big = -INFINITY;
    for (int p = 0; p < parts; ++p) big = fmaxf(big, pm[p]);
    float total = 0.0f;
    for (int p = 0; p < parts; ++p) total += expf(pm[p] - big) * ps[p];
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    for (int c = threadIdx.x; c < head_dim_v; c += DECODE_THREADS) {
        float sum = 0.0f;
        for (int p = 0; p < parts; ++p) sum += expf(pm[p] - big) * partial_out[(bh * max_partitions + p) * head_dim_v + c];
        out[bh * head_dim_v + c] = from_float<T>(sum * inv);
    }
}
