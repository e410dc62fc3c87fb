// rms_norm and layer_norm with the fused residual add, one block of 256 threads per row.
//
// 256 threads are 4 waves on CDNA (wave64) and 8 on RDNA (wave32); the block reductions in
// common.h handle either. The row is read from global memory once: each thread keeps the first
// ROW_CACHE of its elements of s = x (+ residual) in registers (fp32, so the sum is never
// rounded to T before normalizing), which covers hidden <= 16 * 256 = 4096 entirely. Longer
// rows recompute s from x and residual for the elements past the cache (same fp32 values).
// 16 cached floats are 16 VGPRs: with __launch_bounds__(256) the compiler may use up to 128
// VGPRs per lane on wave64 (gfx90a: 512 per SIMD lane / 4 waves of the block per SIMD), so the
// cache costs no occupancy that the row-per-block layout would not already lose.
//
// Outputs must not alias the inputs (the tail recomputation re-reads x and residual).
#include "common.h"

#define ROW_CACHE 16

template <typename T>
__device__ __forceinline__ float summed(const T* __restrict__ x, const T* __restrict__ residual, long long at) {
    float s = to_f32(x[at]);
    if (residual) s += to_f32(residual[at]);
    return s;
}

// Loads s for this thread's elements, writes residual_out, fills the cache; returns the
// thread's partial sum of f(s) where f is s (layer_norm mean) or s*s (rms_norm).
template <typename T, bool SQUARE>
__device__ __forceinline__ float load_row(const T* __restrict__ x, const T* __restrict__ residual, T* __restrict__ residual_out,
                                          long long base, int hidden, float cache[ROW_CACHE]) {
    float acc = 0.0f;
#pragma unroll
    for (int j = 0; j < ROW_CACHE; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        float s = 0.0f;
        if (i < hidden) {
            s = summed(x, residual, base + i);
            if (residual_out) residual_out[base + i] = from_f32<T>(s);
        }
        cache[j] = s;
        acc += SQUARE ? s * s : s;
    }
    for (int i = threadIdx.x + ROW_CACHE * blockDim.x; i < hidden; i += blockDim.x) {
        const float s = summed(x, residual, base + i);
        if (residual_out) residual_out[base + i] = from_f32<T>(s);
        acc += SQUARE ? s * s : s;
    }
    return acc;
}

template <typename T>
__global__ __launch_bounds__(256) void rms_norm(const T* __restrict__ x, const T* __restrict__ residual, const float* __restrict__ weight,
                                                T* __restrict__ y, T* __restrict__ residual_out, int rows, int hidden, float eps) {
    __shared__ float scratch[HAL_MAX_WAVES];
    const int row = blockIdx.x;
    if (row >= rows) return;  // uniform across the block: no barrier is skipped by part of it
    const long long base = (long long)row * hidden;

    float cache[ROW_CACHE];
    const float sq = block_sum(load_row<T, true>(x, residual, residual_out, base, hidden, cache), scratch);
    // Squares are summed in fp32: an fp16 input of 5e3 squared would overflow fp16, not fp32.
    const float inv = rsqrtf(sq / (float)hidden + eps);

#pragma unroll
    for (int j = 0; j < ROW_CACHE; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < hidden) y[base + i] = from_f32<T>(cache[j] * inv * weight[i]);
    }
    for (int i = threadIdx.x + ROW_CACHE * blockDim.x; i < hidden; i += blockDim.x)
        y[base + i] = from_f32<T>(summed(x, residual, base + i) * inv * weight[i]);
}

template <typename T>
__global__ __launch_bounds__(256) void layer_norm(const T* __restrict__ x, const T* __restrict__ residual, const float* __restrict__ weight,
                                                  const float* __restrict__ bias, T* __restrict__ y, T* __restrict__ residual_out,
                                                  int rows, int hidden, float eps) {
    __shared__ float scratch[HAL_MAX_WAVES];
    const int row = blockIdx.x;
    if (row >= rows) return;
    const long long base = (long long)row * hidden;

    float cache[ROW_CACHE];
    const float mean = block_sum(load_row<T, false>(x, residual, residual_out, base, hidden, cache), scratch) / (float)hidden;

    // Two-pass variance (sum of (s - mean)^2), not E[s^2] - mean^2: no cancellation when
    // |mean| >> std. The second pass reads registers, not memory, for cached elements.
    float dev = 0.0f;
#pragma unroll
    for (int j = 0; j < ROW_CACHE; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        const float d = cache[j] - mean;
        if (i < hidden) dev += d * d;
    }
    for (int i = threadIdx.x + ROW_CACHE * blockDim.x; i < hidden; i += blockDim.x) {
        const float d = summed(x, residual, base + i) - mean;
        dev += d * d;
    }
    const float inv = rsqrtf(block_sum(dev, scratch) / (float)hidden + eps);

#pragma unroll
    for (int j = 0; j < ROW_CACHE; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < hidden) y[base + i] = from_f32<T>((cache[j] - mean) * inv * weight[i] + (bias ? bias[i] : 0.0f));
    }
    for (int i = threadIdx.x + ROW_CACHE * blockDim.x; i < hidden; i += blockDim.x)
        y[base + i] = from_f32<T>((summed(x, residual, base + i) - mean) * inv * weight[i] + (bias ? bias[i] : 0.0f));
}
