// Rotary position embedding of q [tokens, heads_q, head_dim] and k [tokens, heads_kv, head_dim].
// One block of 128 threads (two waves on CDNA, four on RDNA) per token. The token's rotated
// pairs of all heads, q first then k, are spread over the threads, so a block stays busy even
// for one head; the dims past rotary_dim are copied by a second loop.
// NeoX (interleaved = 0) pairs x[p] with x[p + rotary_dim / 2]; GPT-J pairs x[2p], x[2p + 1].
#include "common.h"

template <typename T>
__device__ __forceinline__ void rotate_pair(const T* __restrict__ in, T* __restrict__ out, int a, int b, float c, float s) {
    const float x1 = to_f32(in[a]), x2 = to_f32(in[b]);
    out[a] = from_f32<T>(x1 * c - x2 * s);
    out[b] = from_f32<T>(x2 * c + x1 * s);
}

template <typename T, typename P>
__global__ __launch_bounds__(128) void rope(const T* __restrict__ q, const T* __restrict__ k, const float* __restrict__ cos,
                                            const float* __restrict__ sin, const P* __restrict__ positions, T* __restrict__ q_out,
                                            T* __restrict__ k_out, int tokens, int heads_q, int heads_kv, int head_dim, int rotary_dim,
                                            int interleaved) {
    const int token = blockIdx.x;
    if (token >= tokens) return;
    const int half = rotary_dim / 2;
    const long long pos = (long long)positions[token];
    const float* cos_row = cos + pos * half;
    const float* sin_row = sin + pos * half;
    const int heads = heads_q + heads_kv;

    for (int idx = threadIdx.x; idx < heads * half; idx += blockDim.x) {
        const int h = idx / half, p = idx % half;
        const bool is_q = h < heads_q;
        const long long at = is_q ? ((long long)token * heads_q + h) * head_dim : ((long long)token * heads_kv + (h - heads_q)) * head_dim;
        const int a = interleaved ? 2 * p : p;
        const int b = interleaved ? 2 * p + 1 : p + half;
        rotate_pair(is_q ? q + at : k + at, is_q ? q_out + at : k_out + at, a, b, cos_row[p], sin_row[p]);
    }

    const int pass = head_dim - rotary_dim;  // dims past rotary_dim are copied unchanged
    for (int idx = threadIdx.x; idx < heads * pass; idx += blockDim.x) {
        const int h = idx / pass, e = rotary_dim + idx % pass;
        if (h < heads_q) {
            const long long at = ((long long)token * heads_q + h) * head_dim + e;
            q_out[at] = q[at];
        } else {
            const long long at = ((long long)token * heads_kv + (h - heads_q)) * head_dim + e;
            k_out[at] = k[at];
        }
    }
}
