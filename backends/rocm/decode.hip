// Vendor file: the split-K decode is sized for wave64 (lane groups of a wave share a token, 4-element
// chunks per lane to keep VGPRs low) and merges partials with wave-wide shuffles.
// Decode attention over paged KV caches, written for AMD: one query token per sequence
// (paged_decode_attention and DeepSeek's absorbed MLA decode, semantics in ops/attention.py),
// split-K over the sequence as docs/gpu-kernels.md specifies:
//
//   paged_decode_partition<T, C>  grid (max_partitions, heads_q, batch), block 256
//   mla_decode_partition<T>       grid (max_partitions, heads, batch),   block 256
//   decode_merge<T>               grid (heads, batch),                   block 256
//
// Partition p of sequence b covers tokens [p * partition_size, min((p + 1) * partition_size,
// seq_lens[b])); it writes its unnormalized fp32 accumulator sum_t exp(s_t - m) v_t to
// partial_out[b][h][p][:], and m, sum_t exp(s_t - m) to partial_max / partial_sum. Partitions
// past the end write nothing; the merge reads only the partitions the sequence has. A 16384-token
// sequence is 32 blocks per head instead of one block streaming 16384 rows.
//
// Decode is bound by KV-cache bandwidth, so the layout is chosen for the loads:
//   scores:  8 lanes per token, each lane 4 consecutive elements (8 bytes of f16, 4 of fp8) per
//            step, 32 tokens in flight per block pass; the 8 partial dots meet through 3 xor
//            shuffles inside the 8-lane group (groups never straddle a wave: 8 | 32 | 64);
//   values:  wave w takes tokens w, w + waves, ...; its lanes cover 4 consecutive columns each,
//            so a wave reads one contiguous 4 * warpSize-element stretch of a V row per token;
//            the per-wave partials meet in LDS once per column stretch.
// Tokens are processed in chunks of DECODE_CHUNK with their probabilities in LDS and an online
// softmax across chunks (one chunk when partition_size <= 512, the ABI value).
// LDS: q (fp32) 4 KiB + probabilities 2 KiB + accumulator 4 KiB + wave partials 4 KiB = 14 KiB
// static, so 4 blocks fit in a CU's 64 KiB; head dims up to DECODE_MAX_D (MLA: 512 + 64 = 576).
//
// fp8 caches (C = unsigned char): kv_format 1 = OCP e4m3fn, 2 = e4m3fnuz (MI300), decoded in
// software (hal_gpu.h); k_scale folds into the score scale and v_scale into the partial output,
// both exact up to one fp32 rounding.
#include "hal_gpu.h"

#define DECODE_CHUNK 512   // tokens whose probabilities sit in LDS at once
#define DECODE_MAX_D 1024  // longest q / value row held in LDS
#define DECODE_GROUP 8     // lanes per token in the score pass

// Dot of q_s[q_off .. q_off + n) with row[0 .. n): this lane's part (lane g of the 8-lane
// group takes elements 4 g + 32 i .. + 3).
template <typename C>
__device__ __forceinline__ float partial_dot(const float* q_s, const C* row, int n, bool vec, int fmt, int g) {
    float dot = 0.0f;
    for (int c = 4 * g; c < n; c += 4 * DECODE_GROUP) {
        float kv[4];
        load4_float(row + c, n - c, vec, fmt, kv);
#pragma unroll
        for (int e = 0; e < 4; ++e) dot += q_s[c + e] * kv[e];  // q_s is zero past n (see below)
    }
    return dot;
}

// One partition of one (sequence, head): the shared body of both decode kernels.
// key_dot(token, g) -> this lane's part of q . k_token (unscaled); value_row(token) -> the
// token's value row (dv elements of C, converted with kv_format).
template <typename C, typename KeyDot, typename ValueRow>
__device__ __forceinline__ void decode_partition_body(float* q_s, int start, int end, int dv, float score_scale, float softcap, float v_scale,
                                                      int kv_format, bool v_vec, float* out_row, float* out_max, float* out_sum,
                                                      KeyDot key_dot, ValueRow value_row) {
    __shared__ float p_s[DECODE_CHUNK];
    __shared__ float acc_s[DECODE_MAX_D];
    __shared__ float red[4 * 256];  // per-wave partials: waves * 4 * warpSize = 4 * blockDim
    __shared__ float scratch[HAL_MAX_WARPS];
    const int tid = threadIdx.x, lane = tid % warpSize, wave = tid / warpSize, waves = blockDim.x / warpSize;
    const int group = tid / DECODE_GROUP, g = tid % DECODE_GROUP, groups = blockDim.x / DECODE_GROUP;
    const int stretch = 4 * warpSize;  // value columns per wave pass

    for (int c = tid; c < dv; c += blockDim.x) acc_s[c] = 0.0f;
    float m = -INFINITY, l = 0.0f;

    for (int c0 = start; c0 < end; c0 += DECODE_CHUNK) {
        const int n = min(DECODE_CHUNK, end - c0);
        // Scores. Every lane runs the shuffles (lanes past n contribute 0 and store nothing).
        for (int t0 = 0; t0 < n; t0 += groups) {
            const int t = t0 + group;
            float dot = t < n ? key_dot(c0 + t, g) : 0.0f;
            for (int o = DECODE_GROUP / 2; o > 0; o >>= 1) dot += __shfl_xor(dot, o);
            if (t < n && g == 0) {
                float sc = dot * score_scale;
                if (softcap > 0.0f) sc = softcap * tanhf(sc / softcap);
                p_s[t] = sc;
            }
        }
        __syncthreads();
        float lm = -INFINITY;
        for (int t = tid; t < n; t += blockDim.x) lm = fmaxf(lm, p_s[t]);
        const float m_new = fmaxf(m, block_max(lm, scratch));
        const float base = m_new == -INFINITY ? 0.0f : m_new, alpha = __expf(m - base);
        float ls = 0.0f;
        for (int t = tid; t < n; t += blockDim.x) {
            const float p = __expf(p_s[t] - base);
            p_s[t] = p;
            ls += p;
        }
        l = l * alpha + block_sum(ls, scratch);  // its barriers also publish p_s
        m = m_new;

        // Values: acc = acc * alpha + sum_t p_t v_t, one 4 * warpSize column stretch at a time.
        for (int v0 = 0; v0 < dv; v0 += stretch) {
            const int col = v0 + 4 * lane;
            float a[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            if (col < dv) {
                for (int t = wave; t < n; t += waves) {
                    const float p = p_s[t];
                    float vv[4];
                    load4_float(value_row(c0 + t) + col, dv - col, v_vec, kv_format, vv);
#pragma unroll
                    for (int e = 0; e < 4; ++e) a[e] += p * vv[e];
                }
            }
#pragma unroll
            for (int e = 0; e < 4; ++e) red[wave * stretch + 4 * lane + e] = a[e];
            __syncthreads();
            for (int x = tid; x < stretch && v0 + x < dv; x += blockDim.x) {
                float sum = 0.0f;
                for (int w = 0; w < waves; ++w) sum += red[w * stretch + x];
                acc_s[v0 + x] = acc_s[v0 + x] * alpha + sum;
            }
            __syncthreads();
        }
    }
    for (int c = tid; c < dv; c += blockDim.x) out_row[c] = acc_s[c] * v_scale;
    if (tid == 0) {
        *out_max = m;
        *out_sum = l;
    }
}

template <typename T, typename C>
__global__ __launch_bounds__(256) void paged_decode_partition(const T* __restrict__ q, const C* __restrict__ k_cache, const C* __restrict__ v_cache,
                                                              const int* __restrict__ block_table, const int* __restrict__ seq_lens,
                                                              float* __restrict__ partial_out, float* __restrict__ partial_max,
                                                              float* __restrict__ partial_sum, int batch, int heads_q, int heads_kv, int head_dim,
                                                              int head_dim_v, int block_size, int max_blocks, int partition_size,
                                                              int max_partitions, float scale, float softcap, float k_scale, float v_scale,
                                                              int kv_format) {
    __shared__ float q_s[DECODE_MAX_D + 4];
    const int p = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    const int d = head_dim, dv = head_dim_v;
    if (b >= batch || h >= heads_q || p >= max_partitions || heads_kv <= 0 || heads_q % heads_kv || d < 1 || d > DECODE_MAX_D || dv < 1 ||
        dv > DECODE_MAX_D || block_size < 1 || partition_size < 1)
        return;
    const int len = seq_lens[b], start = p * partition_size;
    if (start >= len) return;  // past this sequence's end: nothing to write
    const int end = min(start + partition_size, len);
    const int hkv = h / (heads_q / heads_kv);

    const T* qrow = q + ((long long)b * heads_q + h) * d;
    for (int c = threadIdx.x; c < d + 4; c += blockDim.x) q_s[c] = c < d ? to_float(qrow[c]) : 0.0f;
    __syncthreads();

    const int* table = block_table + (long long)b * max_blocks;
    const long long row_stride = (long long)heads_kv;  // rows of [block, slot] in units of heads
    // Row starts are multiples of d (dv) elements: 4-element vector loads need d % 4 == 0 and
    // an aligned base.
    const bool k_vec = chunks_aligned<C, 4>(k_cache, d), v_vec = chunks_aligned<C, 4>(v_cache, dv);
    auto slot = [&](int t) { return ((long long)table[t / block_size] * block_size + t % block_size) * row_stride + hkv; };
    auto key_dot = [&](int t, int g) { return partial_dot(q_s, k_cache + slot(t) * d, d, k_vec, kv_format, g); };
    auto value_row = [&](int t) { return v_cache + slot(t) * dv; };
    const long long at = ((long long)b * heads_q + h) * max_partitions + p;
    decode_partition_body<C>(q_s, start, end, dv, scale * k_scale, softcap, v_scale, kv_format, v_vec, partial_out + at * dv,
                             partial_max + at, partial_sum + at, key_dot, value_row);
}

// MLA, absorbed form: one MQA head per block against the shared latent cache; key = [c, k_pe],
// query = [q_nope, q_pe] (concatenated in LDS), value = c (dv = latent).
template <typename T>
__global__ __launch_bounds__(256) void mla_decode_partition(const T* __restrict__ q_nope, const T* __restrict__ q_pe, const T* __restrict__ kv_latent,
                                                            const T* __restrict__ k_pe, const int* __restrict__ block_table,
                                                            const int* __restrict__ seq_lens, float* __restrict__ partial_out,
                                                            float* __restrict__ partial_max, float* __restrict__ partial_sum, int batch, int heads,
                                                            int latent, int rope, int block_size, int max_blocks, int partition_size,
                                                            int max_partitions, float scale) {
    __shared__ float q_s[DECODE_MAX_D + 8];
    const int p = blockIdx.x, h = blockIdx.y, b = blockIdx.z;
    if (b >= batch || h >= heads || p >= max_partitions || latent < 1 || rope < 0 || latent + rope > DECODE_MAX_D || block_size < 1 ||
        partition_size < 1)
        return;
    const int len = seq_lens[b], start = p * partition_size;
    if (start >= len) return;
    const int end = min(start + partition_size, len);

    // q_s = [q_nope (latent), 0 x 4, q_pe (rope), 0 x 4]: each part zero-padded so the 4-wide
    // dot loops can read past their end.
    const int pe0 = latent + 4;
    const T* qn = q_nope + ((long long)b * heads + h) * latent;
    const T* qp = q_pe + ((long long)b * heads + h) * rope;
    for (int c = threadIdx.x; c < pe0 + rope + 4; c += blockDim.x)
        q_s[c] = c < latent ? to_float(qn[c]) : c < pe0 ? 0.0f : c < pe0 + rope ? to_float(qp[c - pe0]) : 0.0f;
    __syncthreads();

    const int* table = block_table + (long long)b * max_blocks;
    const bool c_vec = chunks_aligned<T, 4>(kv_latent, latent), pe_vec = chunks_aligned<T, 4>(k_pe, rope);
    auto slot = [&](int t) { return (long long)table[t / block_size] * block_size + t % block_size; };
    auto key_dot = [&](int t, int g) {
        const long long r = slot(t);
        return partial_dot(q_s, kv_latent + r * latent, latent, c_vec, 0, g) +
               partial_dot(q_s + pe0, k_pe + r * rope, rope, pe_vec, 0, g);
    };
    auto value_row = [&](int t) { return kv_latent + slot(t) * latent; };
    const long long at = ((long long)b * heads + h) * max_partitions + p;
    decode_partition_body<T>(q_s, start, end, latent, scale, 0.0f, 1.0f, 0, c_vec, partial_out + at * latent, partial_max + at,
                             partial_sum + at, key_dot, value_row);
}

// out[b][h][:] = sum_p exp(m_p - M) acc_p / sum_p exp(m_p - M) l_p over the partitions the
// sequence has. One block per (head, sequence); the weights are computed once per partition
// (256 at a time in LDS), the columns are spread over the threads.
template <typename T>
__global__ __launch_bounds__(256) void decode_merge(const float* __restrict__ partial_out, const float* __restrict__ partial_max,
                                                    const float* __restrict__ partial_sum, T* __restrict__ out, int batch, int heads,
                                                    int head_dim_v, int max_partitions, const int* __restrict__ seq_lens, int partition_size) {
    __shared__ float w_s[256];
    const int h = blockIdx.x, b = blockIdx.y, dv = head_dim_v, tid = threadIdx.x;
    if (b >= batch || h >= heads || dv < 1 || partition_size < 1) return;
    const int len = seq_lens[b];
    const int parts = len > 0 ? min((len - 1) / partition_size + 1, max_partitions) : 0;
    const long long at = ((long long)b * heads + h) * max_partitions;
    const float* pm = partial_max + at;
    const float* ps = partial_sum + at;

    float mx = -INFINITY;
    for (int p = 0; p < parts; ++p) mx = fmaxf(mx, pm[p]);
    const float base = mx == -INFINITY ? 0.0f : mx;
    float total = 0.0f;
    for (int p = 0; p < parts; ++p) total += ps[p] * __expf(pm[p] - base);
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;

    T* orow = out + ((long long)b * heads + h) * dv;
    // Each thread keeps up to 4 output columns (dv <= 1024) in registers across the weight chunks.
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int p0 = 0; p0 < parts; p0 += 256) {
        __syncthreads();
        if (tid < 256 && p0 + tid < parts) w_s[tid] = __expf(pm[p0 + tid] - base) * inv;
        __syncthreads();
        const int np = min(256, parts - p0);
        for (int p = 0; p < np; ++p) {
            const float w = w_s[p];
            const float* row = partial_out + (at + p0 + p) * dv;
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int c = tid + i * blockDim.x;
                if (c < dv) acc[i] += w * row[c];
            }
        }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int c = tid + i * blockDim.x;
        if (c < dv) orow[c] = from_float<T>(acc[i]);
    }
    // Columns past 4 * blockDim (dv > 1024): a plain loop over the partitions per column.
    for (int c = tid + 4 * blockDim.x; c < dv; c += blockDim.x) {
        float a = 0.0f;
        for (int p = 0; p < parts; ++p) a += partial_out[(at + p) * dv + c] * __expf(pm[p] - base);
        orow[c] = from_float<T>(a * inv);
    }
}
