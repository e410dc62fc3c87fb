// Written once for both vendors in CUDA's dialect; compiled as HIP for AMD through the vendor
// shim hal_vendor.h (docs/gpu-kernels.md).
// Rotary position embedding of q [tokens, heads_q, head_dim] and k [tokens, heads_kv, head_dim].
//
// One block of 128 threads per token (grid = tokens). The token's work is flattened into items:
// per head, one item per rotated pair (rotary_dim / 2) and one per pass-through dimension
// (head_dim - rotary_dim); q's heads first, then k's. A thread reads both members of its pair
// and writes both, so no element is shared between threads and no barrier is needed. The cos/sin
// row of the token's position is read once per pair from fp32 tables [max_position, rotary_dim/2]
// (cached in L1/L2: every head of the token uses the same row).
//
// NeoX (interleaved = 0) pairs (i, i + rotary_dim/2): consecutive items touch consecutive
// addresses. GPT-J (interleaved = 1) pairs (2i, 2i + 1).
#include "hal_gpu.h"

#define ROPE_THREADS 128

template <typename T, typename P>
__global__ void __launch_bounds__(ROPE_THREADS)
rope(const T* __restrict__ q, const T* __restrict__ k, const float* __restrict__ cos, const float* __restrict__ sin,
     const P* __restrict__ positions, T* __restrict__ q_out, T* __restrict__ k_out, int tokens, int heads_q, int heads_kv,
     int head_dim, int rotary_dim, int interleaved) {
    const int token = blockIdx.x;
    if (token >= tokens) return;
    const int half = rotary_dim / 2;
    const long long position = (long long)positions[token];
    const float* cos_row = cos + position * half;
    const float* sin_row = sin + position * half;
    const int per_head = half + (head_dim - rotary_dim);
    const int items = (heads_q + heads_kv) * per_head;

    for (int item = threadIdx.x; item < items; item += blockDim.x) {
        const int head = item / per_head, j = item % per_head;
        const T* src;
        T* dst;
        if (head < heads_q) {
            const long long offset = ((long long)token * heads_q + head) * head_dim;
            src = q + offset;
            dst = q_out + offset;
        } else {
            const long long offset = ((long long)token * heads_kv + (head - heads_q)) * head_dim;
            src = k + offset;
            dst = k_out + offset;
        }
        if (j < half) {
            const int i1 = interleaved ? 2 * j : j;
            const int i2 = interleaved ? 2 * j + 1 : j + half;
            const float x1 = to_float(src[i1]), x2 = to_float(src[i2]);
            const float c = cos_row[j], s = sin_row[j];
            dst[i1] = from_float<T>(x1 * c - x2 * s);
            dst[i2] = from_float<T>(x2 * c + x1 * s);
        } else {
            const int dim = rotary_dim + (j - half);
            dst[dim] = src[dim];
        }
    }
}
