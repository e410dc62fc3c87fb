// Written once for both vendors in CUDA's dialect; compiled as HIP for AMD through the vendor
// shim hal_vendor.h (docs/gpu-kernels.md).
// rms_norm and layer_norm with the fused residual add of transformer blocks.
//
// One block of 256 threads per row (grid = rows). With `residual`, the row normalized is
// s = x + residual (in fp32) and s is also stored to residual_out, so the residual stream is read
// once and written once. Rows up to NORM_CACHED * blockDim.x elements (4096 at 256 threads, the
// common LLM hidden sizes) stay in registers between the reduction and the write: one global read
// per element. Longer rows take a looped fallback that reads x (and residual) again per pass.
//
// Threads stride the row by blockDim.x so that a warp touches 32 consecutive elements per access
// (coalesced). Statistics are fp32, the variance is taken around the mean (no E[s^2] - mean^2
// cancellation), and nothing is squared in the input type (fp16 overflows past 256).
#include "hal_gpu.h"

#define NORM_THREADS 256
// Values per thread held in registers. 16 floats keep the kernel far below the 255-register
// limit and spill-free; the loops over this array have constant trip counts and are fully
// unrolled, so the array lives in registers rather than local memory.
#define NORM_CACHED 16

// s = x (+ residual) at column c, storing s to residual_out when there is a residual.
template <typename T>
__device__ __forceinline__ float summed(const T* __restrict__ x, const T* __restrict__ residual, T* __restrict__ residual_out,
                                        long long c, bool store) {
    float s = to_float(x[c]);
    if (residual) {
        s += to_float(residual[c]);
        if (store) residual_out[c] = from_float<T>(s);
    }
    return s;
}

// The cached path's row: v[i] = s at column threadIdx.x + i * blockDim.x (0 past the row), with
// residual_out stored; the row pointers are already at the block's row.
template <typename T>
__device__ __forceinline__ void cache_row(float (&v)[NORM_CACHED], const T* __restrict__ x, const T* __restrict__ residual,
                                          T* __restrict__ residual_out, int hidden) {
    for (int i = 0; i < NORM_CACHED; ++i) {
        const int c = threadIdx.x + i * blockDim.x;
        v[i] = c < hidden ? summed(x, residual, residual_out, c, true) : 0.0f;
    }
}

template <typename T>
__global__ void __launch_bounds__(NORM_THREADS)
rms_norm(const T* __restrict__ x, const T* __restrict__ residual, const float* __restrict__ weight, T* __restrict__ y,
         T* __restrict__ residual_out, int rows, int hidden, float eps) {
    __shared__ float scratch[HAL_MAX_WARPS];
    const int row = blockIdx.x;
    if (row >= rows || hidden <= 0) return;  // uniform over the block, so no barrier is skipped by part of it
    const long long base = (long long)row * hidden;
    x += base;
    y += base;
    if (residual) {
        residual += base;
        residual_out += base;
    }

    if (hidden <= NORM_CACHED * (int)blockDim.x) {
        float v[NORM_CACHED];
        cache_row(v, x, residual, residual_out, hidden);
        float squares = 0.0f;
        for (int i = 0; i < NORM_CACHED; ++i) squares += v[i] * v[i];
        const float inv_rms = 1.0f / sqrtf(block_sum(squares, scratch) / hidden + eps);
        for (int i = 0; i < NORM_CACHED; ++i) {
            const int c = threadIdx.x + i * blockDim.x;
            if (c < hidden) y[c] = from_float<T>(v[i] * inv_rms * (weight ? weight[c] : 1.0f));
        }
        return;
    }

    // Long rows: pass 1 sums squares (and writes residual_out), pass 2 recomputes s and writes y.
    float squares = 0.0f;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
        const float s = summed(x, residual, residual_out, c, true);
        squares += s * s;
    }
    const float inv_rms = 1.0f / sqrtf(block_sum(squares, scratch) / hidden + eps);
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
        const float s = summed(x, residual, residual_out, c, false);
        y[c] = from_float<T>(s * inv_rms * (weight ? weight[c] : 1.0f));
    }
}

template <typename T>
__global__ void __launch_bounds__(NORM_THREADS)
layer_norm(const T* __restrict__ x, const T* __restrict__ residual, const float* __restrict__ weight, const float* __restrict__ bias,
           T* __restrict__ y, T* __restrict__ residual_out, int rows, int hidden, float eps) {
    __shared__ float scratch[HAL_MAX_WARPS];
    const int row = blockIdx.x;
    if (row >= rows || hidden <= 0) return;
    const long long base = (long long)row * hidden;
    x += base;
    y += base;
    if (residual) {
        residual += base;
        residual_out += base;
    }

    if (hidden <= NORM_CACHED * (int)blockDim.x) {
        float v[NORM_CACHED];
        cache_row(v, x, residual, residual_out, hidden);
        float sum = 0.0f;
        for (int i = 0; i < NORM_CACHED; ++i) sum += v[i];
        const float mean = block_sum(sum, scratch) / hidden;
        float deviations = 0.0f;
        for (int i = 0; i < NORM_CACHED; ++i) {
            const int c = threadIdx.x + i * blockDim.x;
            const float d = c < hidden ? v[i] - mean : 0.0f;
            deviations += d * d;
        }
        const float inv_std = 1.0f / sqrtf(block_sum(deviations, scratch) / hidden + eps);
        for (int i = 0; i < NORM_CACHED; ++i) {
            const int c = threadIdx.x + i * blockDim.x;
            if (c < hidden)
                y[c] = from_float<T>((v[i] - mean) * inv_std * (weight ? weight[c] : 1.0f) + (bias ? bias[c] : 0.0f));
        }
        return;
    }

    // Long rows: mean, then variance around it, then the write; s recomputed from x + residual.
    float sum = 0.0f;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) sum += summed(x, residual, residual_out, c, true);
    const float mean = block_sum(sum, scratch) / hidden;
    float deviations = 0.0f;
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
        const float d = summed(x, residual, residual_out, c, false) - mean;
        deviations += d * d;
    }
    const float inv_std = 1.0f / sqrtf(block_sum(deviations, scratch) / hidden + eps);
    for (int c = threadIdx.x; c < hidden; c += blockDim.x) {
        const float s = summed(x, residual, residual_out, c, false);
        y[c] = from_float<T>((s - mean) * inv_std * (weight ? weight[c] : 1.0f) + (bias ? bias[c] : 0.0f));
    }
}
