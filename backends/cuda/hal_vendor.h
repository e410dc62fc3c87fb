// The CUDA shim of hal's kernels: what the vendor-neutral header (backends/gpu/kernels/hal_gpu.h)
// and the shared kernel files need from CUDA, and nothing else. The HIP shim
// (backends/rocm/hal_vendor.h) provides the same names. Hardware facts: docs/hardware.md.
#pragma once

// nvcc includes cuda_runtime.h implicitly, NVRTC does not (it compiles it fine from the same include
// directory as cuda_fp16.h); the emulator's stand-in declares the warp collectives.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

// NVRTC has no <math.h>, so INFINITY is not predefined there.
#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)  // as CUDART_INF_F in math_constants.h
#endif

#if defined(HAL_SIM)
#define HAL_DYNAMIC_SHARED(type, name) HAL_SIM_DYNAMIC_SHARED(type, name)
#else
#define HAL_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

// __launch_bounds__ with a minimum of resident blocks per SM (a register budget for ptxas).
#define HAL_LAUNCH_BOUNDS_MIN_BLOCKS(threads, blocks) __launch_bounds__(threads, blocks)

// ---------------------------------------------------------------- element types
typedef __nv_bfloat16 bf16;
__device__ __forceinline__ float half_to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ __half float_to_half(float x) { return __float2half_rn(x); }
__device__ __forceinline__ float bf16_to_float(bf16 x) { return __bfloat162float(x); }
__device__ __forceinline__ bf16 float_to_bf16(float x) { return __float2bfloat16_rn(x); }

// ---------------------------------------------------------------- warps
// 32 lanes on every NVIDIA architecture. HAL_WARP_MAX is the compile-time width (launch bounds of
// one-warp-per-item kernels); code reads warpSize at run time like on AMD.
#define HAL_WARP_MAX 32
typedef unsigned lane_mask_t;  // one bit per lane
#define HAL_FULL_MASK 0xffffffffu
// Whole-warp collectives: every lane of the warp calls them (the kernels call them outside
// divergent code).
template <typename V> __device__ __forceinline__ V warp_shfl(V v, int src_lane) { return __shfl_sync(HAL_FULL_MASK, v, src_lane); }
template <typename V> __device__ __forceinline__ V warp_shfl_xor(V v, int lane_mask) { return __shfl_xor_sync(HAL_FULL_MASK, v, lane_mask); }
template <typename V> __device__ __forceinline__ V warp_shfl_down(V v, unsigned delta) { return __shfl_down_sync(HAL_FULL_MASK, v, delta); }
__device__ __forceinline__ lane_mask_t warp_ballot(int predicate) { return __ballot_sync(HAL_FULL_MASK, predicate); }

// ---------------------------------------------------------------- fp8 the matrix units read
// mma.sync's e4m3 inputs (sm_89+) are OCP e4m3fn; the code comes from hal.codes (-D options).
#define HAL_FMT_NATIVE_FP8 HAL_FMT_FP8_E4M3FN

// ---------------------------------------------------------------- mma.sync wrappers
// Per lane of a warp, fp32 (or exact s32) accumulate, d and c may be the same array; lane layouts
// in docs/hardware.md. m16n8k16: A 4 x b32 (8 halves), B 2 x b32 (4 halves), C/D 4 floats.
// m16n8k32 (8-bit inputs): A 4 x b32 (16 bytes), B 2 x b32 (8 bytes), lowest byte first; e4m3 needs
// sm_89+ (the glue instantiates its callers there only), s8 exists from sm_80.
#if defined(HAL_SIM)
#include <hal_sim/mma.h>
#else
#define HAL_MMA_ASM(shape_types, D, C)                                                                                          \
    asm volatile("mma.sync.aligned." shape_types " {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"      \
                 : "=" D(d[0]), "=" D(d[1]), "=" D(d[2]), "=" D(d[3])                                                          \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), C(c[0]), C(c[1]), C(c[2]), C(c[3]))
__device__ __forceinline__ void mma_m16n8k16_f16(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) {
    HAL_MMA_ASM("m16n8k16.row.col.f32.f16.f16.f32", "f", "f");
}
__device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) {
    HAL_MMA_ASM("m16n8k16.row.col.f32.bf16.bf16.f32", "f", "f");
}
__device__ __forceinline__ void mma_m16n8k32_e4m3(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) {
    HAL_MMA_ASM("m16n8k32.row.col.f32.e4m3.e4m3.f32", "f", "f");
}
__device__ __forceinline__ void mma_m16n8k32_s8(int d[4], const unsigned a[4], const unsigned b[2], const int c[4]) {
    HAL_MMA_ASM("m16n8k32.row.col.s32.s8.s8.s32", "r", "r");
}
#undef HAL_MMA_ASM
#endif

// The m16n8k16 wrapper for a 16-bit element type, chosen at compile time.
template <typename T> struct Mma;
template <> struct Mma<__half> {
    static __device__ __forceinline__ void run(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) { mma_m16n8k16_f16(d, a, b, c); }
};
template <> struct Mma<bf16> {
    static __device__ __forceinline__ void run(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) { mma_m16n8k16_bf16(d, a, b, c); }
};
