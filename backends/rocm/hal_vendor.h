// The HIP shim of hal's kernels: what the vendor-neutral header (backends/gpu/kernels/hal_gpu.h)
// and the shared kernel files need from HIP, and nothing else. The CUDA shim
// (backends/cuda/hal_vendor.h) provides the same names. Hardware facts: docs/hardware.md.
//
// A wave is 64 lanes on CDNA (gfx90a, gfx94x) and 32 on RDNA (gfx10/11, wave32 by default), so
// shared code reads warpSize at run time; HAL_WARP_MAX is only the widest case.
#pragma once

// hipRTC (ROCm 5.x) already provides the runtime and fp16 declarations; including the system
// headers again there redefines them.
#ifndef __HIPCC_RTC__
#include <hip/hip_runtime.h>
#include <hip/hip_fp16.h>
#endif
#if defined(__HIPCC_RTC__) && HIP_VERSION_MAJOR < 6
// ROCm 5.x's hip_bfloat16.h includes <cmath> and <iostream>, which hipRTC cannot; this is the
// same type (16-bit storage, round-to-nearest-even from float, NaN kept quiet), device side only.
struct hip_bfloat16 {
    unsigned short data;
    hip_bfloat16() = default;
    explicit __device__ hip_bfloat16(float f) {
        const unsigned u = __builtin_bit_cast(unsigned, f);
        data = (u & 0x7fffffffu) > 0x7f800000u ? (unsigned short)((u >> 16) | 0x40u) : (unsigned short)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    __device__ operator float() const { return __builtin_bit_cast(float, (unsigned)data << 16); }
};
#else
#include <hip/hip_bfloat16.h>
#endif

#ifndef INFINITY  // hipRTC has no <cmath>
#define INFINITY __builtin_huge_valf()
#endif

#ifdef HAL_SIM
#define HAL_DYNAMIC_SHARED(type, name) HAL_SIM_DYNAMIC_SHARED(type, name)
#else
#define HAL_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

// HIP's second __launch_bounds__ argument means waves per execution unit, not blocks per SM: the
// CUDA register budget does not translate, so AMD keeps the compiler's choice for the block size.
#define HAL_LAUNCH_BOUNDS_MIN_BLOCKS(threads, blocks) __launch_bounds__(threads)

// ------------------------------------------------------------------ element types
typedef hip_bfloat16 bf16;
__device__ __forceinline__ float half_to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ __half float_to_half(float x) { return __float2half(x); }  // RNE
__device__ __forceinline__ float bf16_to_float(bf16 x) { return float(x); }
__device__ __forceinline__ bf16 float_to_bf16(float x) { return bf16(x); }  // RNE

// ------------------------------------------------------------------ waves
#define HAL_WARP_MAX 64
typedef unsigned long long lane_mask_t;  // one bit per lane: 64-bit masks
#define HAL_FULL_MASK (~0ull)
// Whole-wave collectives. The legacy maskless forms, because ROCm 5.2 has no *_sync forms; every
// lane of the wave is active at each call site (the kernels call them outside divergent code).
template <typename V> __device__ __forceinline__ V warp_shfl(V v, int src_lane) { return __shfl(v, src_lane); }
template <typename V> __device__ __forceinline__ V warp_shfl_xor(V v, int lane_mask) { return __shfl_xor(v, lane_mask); }
template <typename V> __device__ __forceinline__ V warp_shfl_down(V v, unsigned delta) { return __shfl_down(v, delta); }
__device__ __forceinline__ lane_mask_t warp_ballot(int predicate) { return __ballot(predicate); }

// ------------------------------------------------------------------ fp8 the matrix units read
// gfx940/941/942 (CDNA3) read FNUZ e4m3 (bias 8, NaN 0x80); the code comes from hal.codes (-D).
#define HAL_FMT_NATIVE_FP8 HAL_FMT_FP8_E4M3FNUZ

// ------------------------------------------------------------------ MFMA wrappers
// v_mfma_f32_32x32x8{f16,bf16_1k}, wave64, per lane (layouts in docs/hardware.md):
//   A: row = lane % 32, k = 4 * (lane / 32) + r      (r = 0..3)
//   B: col = lane % 32, k = 4 * (lane / 32) + r
//   C/D: col = lane % 32, row = 8 * (r / 4) + 4 * (lane / 32) + r % 4   (r = 0..15)
#ifdef HAL_SIM
#include <hal_sim/mma.h>
#else
typedef _Float16 hal_f16x4 __attribute__((ext_vector_type(4)));
typedef short hal_i16x4 __attribute__((ext_vector_type(4)));
typedef float hal_f32x16 __attribute__((ext_vector_type(16)));

// Only CDNA2/3 have these instructions; gemm_mfma is never instantiated for other targets,
// the trap keeps an accidental instantiation from compiling to silent garbage.
#if defined(__gfx90a__) || defined(__gfx940__) || defined(__gfx941__) || defined(__gfx942__)
#define HAL_HAS_MFMA 1
#endif

__device__ __forceinline__ void mfma_f32_32x32x8_f16(float d[16], const __half a[4], const __half b[4], const float c[16]) {
#ifdef HAL_HAS_MFMA
    hal_f16x4 va, vb;
    hal_f32x16 vc;
    __builtin_memcpy(&va, a, sizeof(va));
    __builtin_memcpy(&vb, b, sizeof(vb));
    __builtin_memcpy(&vc, c, sizeof(vc));
    // The 16 accumulators live in AGPRs on gfx90a (separate 256-entry file), so they do not
    // count against the VGPR budget of the loads.
    vc = __builtin_amdgcn_mfma_f32_32x32x8f16(va, vb, vc, 0, 0, 0);
    __builtin_memcpy(d, &vc, sizeof(vc));
#else
    (void)d, (void)a, (void)b, (void)c;
    __builtin_trap();
#endif
}

__device__ __forceinline__ void mfma_f32_32x32x8_bf16(float d[16], const hip_bfloat16 a[4], const hip_bfloat16 b[4], const float c[16]) {
#ifdef HAL_HAS_MFMA
    hal_i16x4 va, vb;  // the _1k variant takes bf16 as raw 16-bit integers
    hal_f32x16 vc;
    __builtin_memcpy(&va, a, sizeof(va));
    __builtin_memcpy(&vb, b, sizeof(vb));
    __builtin_memcpy(&vc, c, sizeof(vc));
    vc = __builtin_amdgcn_mfma_f32_32x32x8bf16_1k(va, vb, vc, 0, 0, 0);
    __builtin_memcpy(d, &vc, sizeof(vc));
#else
    (void)d, (void)a, (void)b, (void)c;
    __builtin_trap();
#endif
}

// One-byte inputs, 32x32x16 (the quantized GEMMs): A and B are 8 bytes per lane in 2 registers,
// low byte first; A: row = lane % 32, k = 8 * (lane / 32) + r (r = 0..7); B: col = lane % 32,
// same k; C/D as above.
typedef int hal_i32x16 __attribute__((ext_vector_type(16)));

#if defined(__gfx940__) || defined(__gfx941__) || defined(__gfx942__)
#define HAL_HAS_MFMA_CDNA3 1
#endif

// v_mfma_f32_32x32x16_fp8_fp8, CDNA3 only. gfx940/941/942 read FNUZ e4m3 (bias 8, NaN 0x80);
// OCP e4m3fn bytes would come out as half their value.
__device__ __forceinline__ void mfma_f32_32x32x16_fp8(float d[16], const unsigned a[2], const unsigned b[2], const float c[16]) {
#ifdef HAL_HAS_MFMA_CDNA3
    long va, vb;
    hal_f32x16 vc;
    __builtin_memcpy(&va, a, sizeof(va));
    __builtin_memcpy(&vb, b, sizeof(vb));
    __builtin_memcpy(&vc, c, sizeof(vc));
    vc = __builtin_amdgcn_mfma_f32_32x32x16_fp8_fp8(va, vb, vc, 0, 0, 0);
    __builtin_memcpy(d, &vc, sizeof(vc));
#else
    (void)d, (void)a, (void)b, (void)c;
    __builtin_trap();
#endif
}

// int8 x int8 -> exact int32. CDNA3 has v_mfma_i32_32x32x16_i8 (and dropped 32x32x8i8); CDNA2 has
// only v_mfma_i32_32x32x8i8 (4 bytes per lane, k = 4 * (lane / 32) + r), so there the two
// registers go through it one after the other: the first sums k 0..3 and 8..11 of the 16, the
// second 4..7 and 12..15. Same result (integer sums are exact), same cost per k.
__device__ __forceinline__ void mfma_i32_32x32x16_i8(int d[16], const unsigned a[2], const unsigned b[2], const int c[16]) {
#if defined(HAL_HAS_MFMA_CDNA3)
    long va, vb;
    hal_i32x16 vc;
    __builtin_memcpy(&va, a, sizeof(va));
    __builtin_memcpy(&vb, b, sizeof(vb));
    __builtin_memcpy(&vc, c, sizeof(vc));
    vc = __builtin_amdgcn_mfma_i32_32x32x16_i8(va, vb, vc, 0, 0, 0);
    __builtin_memcpy(d, &vc, sizeof(vc));
#elif defined(HAL_HAS_MFMA)
    hal_i32x16 vc;
    __builtin_memcpy(&vc, c, sizeof(vc));
    vc = __builtin_amdgcn_mfma_i32_32x32x8i8((int)a[0], (int)b[0], vc, 0, 0, 0);
    vc = __builtin_amdgcn_mfma_i32_32x32x8i8((int)a[1], (int)b[1], vc, 0, 0, 0);
    __builtin_memcpy(d, &vc, sizeof(vc));
#else
    (void)d, (void)a, (void)b, (void)c;
    __builtin_trap();
#endif
}
#endif

// The 32x32x8 instruction for the element type, chosen by overload (gemm, grouped_gemm).
__device__ __forceinline__ void mfma_32x32x8(float d[16], const __half a[4], const __half b[4], const float c[16]) {
    mfma_f32_32x32x8_f16(d, a, b, c);
}
__device__ __forceinline__ void mfma_32x32x8(float d[16], const hip_bfloat16 a[4], const hip_bfloat16 b[4], const float c[16]) {
    mfma_f32_32x32x8_bf16(d, a, b, c);
}
