// Shared by every hal CUDA kernel file: element types, fp32 load/store of T, warp and block
// reductions, the gemm epilogue activations, and the mma.sync wrappers.
//
// Kernel code uses only what docs/gpu-kernels.md lists, so that the host emulator (backends/sim,
// which compiles these files with the host C++ compiler under -DHAL_SIM) can run it unchanged.
// The two `#if defined(HAL_SIM)` blocks below are the only emulator-specific lines.
#pragma once

// nvcc includes cuda_runtime.h implicitly, NVRTC does not (it compiles it fine from the same
// include directory as cuda_fp16.h); the emulator's stand-in declares the warp collectives.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

// NVRTC has no <math.h>, so INFINITY (part of the kernel contract) is not predefined there.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)  // as CUDART_INF_F in math_constants.h
#endif

// ---------------------------------------------------------------- dynamic shared memory

#if defined(HAL_SIM)
#define HAL_DYNAMIC_SHARED(type, name) HAL_SIM_DYNAMIC_SHARED(type, name)
#else
#define HAL_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

// ---------------------------------------------------------------- element types <-> fp32
// Every kernel computes in fp32: T is widened on load and rounded (to nearest even) on store.

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// ---------------------------------------------------------------- reductions
// Warp level with butterfly shuffles (every lane ends with the result), then one pass through
// shared memory across the warps of the block. Loops start at warpSize / 2, never at a literal.

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = warpSize / 2; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = warpSize / 2; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Room for the per-warp partials of the largest block (1024 threads / 32); a block uses only its
// first blockDim.x / warpSize entries.
#define HAL_MAX_WARPS 32

__device__ __forceinline__ int warps_per_block() { return (blockDim.x + warpSize - 1) / warpSize; }

// Sum over the block, returned to every thread. `scratch` is __shared__ float[HAL_MAX_WARPS].
// The leading barrier lets a kernel call this back to back with the same scratch (the previous
// call's readers are done before lane 0 overwrites it); every warp then reduces the partials
// itself, so no trailing barrier or broadcast slot is needed.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps_per_block() ? scratch[lane] : 0.0f;
    return warp_sum(v);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < warps_per_block() ? scratch[lane] : -INFINITY;
    return warp_max(v);
}

// ---------------------------------------------------------------- activations (gemm epilogue codes)

#define HAL_ACT_NONE 0
#define HAL_ACT_RELU 1
#define HAL_ACT_GELU 2       // exact, erf form
#define HAL_ACT_GELU_TANH 3  // tanh approximation
#define HAL_ACT_SILU 4

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }  // -> -0 for x << 0, no NaN

__device__ __forceinline__ float activate(float x, int activation) {
    switch (activation) {
        case HAL_ACT_RELU: return fmaxf(x, 0.0f);
        case HAL_ACT_GELU: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));
        case HAL_ACT_GELU_TANH: return 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
        case HAL_ACT_SILU: return silu(x);
        default: return x;
    }
}

// ---------------------------------------------------------------- tensor-core wrappers
// mma.sync.aligned.m16n8k16.row.col, fp32 accumulate; per lane A is 4 x b32 (8 halves), B 2 x b32
// (4 halves), C/D 4 floats, lane layouts in gpu-facts.md. d and c may be the same array.

#if defined(HAL_SIM)
#include <hal_sim/mma.h>
#else
__device__ __forceinline__ void mma_m16n8k16_f16(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

__device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}
#endif

// The wrapper for a 16-bit element type, chosen at compile time.
template <typename T> struct Mma;
template <> struct Mma<__half> {
    static __device__ __forceinline__ void run(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) { mma_m16n8k16_f16(d, a, b, c); }
};
template <> struct Mma<__nv_bfloat16> {
    static __device__ __forceinline__ void run(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) { mma_m16n8k16_bf16(d, a, b, c); }
};
