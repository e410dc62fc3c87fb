// Shared by every hal HIP kernel file: element types, fp32 load/store of T, wave and block
// reductions, the gemm epilogue activations, and the MFMA wrappers.
//
// Written for AMD: a wave is 64 lanes on CDNA (gfx90a, gfx94x) and 32 lanes on RDNA (gfx10/11,
// wave32 by default), so nothing here assumes a width: loops start at `warpSize / 2` and
// per-wave scratch is indexed by `threadIdx.x / warpSize`, both read at run time.
//
// Only what docs/gpu-kernels.md lists is used, so the host emulator (HAL_SIM) runs these files.
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

// ------------------------------------------------------------------ dynamic LDS
#ifdef HAL_SIM
#define HAL_DYNAMIC_SHARED(type, name) HAL_SIM_DYNAMIC_SHARED(type, name)
#else
#define HAL_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

// Most waves a block can have: 1024 threads / 32 lanes (wave32 RDNA). Static LDS scratch is
// sized by this bound; the number of entries actually used is blockDim.x / warpSize.
#define HAL_MAX_WAVES 32

// ------------------------------------------------------------------ element types <-> fp32
__device__ __forceinline__ float to_f32(float v) { return v; }
__device__ __forceinline__ float to_f32(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f32(hip_bfloat16 v) { return float(v); }

template <typename T> struct FromF32;
template <> struct FromF32<float> {
    static __device__ __forceinline__ float cvt(float v) { return v; }
};
template <> struct FromF32<__half> {
    static __device__ __forceinline__ __half cvt(float v) { return __float2half(v); }  // RNE
};
template <> struct FromF32<hip_bfloat16> {
    static __device__ __forceinline__ hip_bfloat16 cvt(float v) { return hip_bfloat16(v); }  // RNE
};
template <typename T> __device__ __forceinline__ T from_f32(float v) { return FromF32<T>::cvt(v); }

// ------------------------------------------------------------------ fp8 (KV caches) -> fp32
// No CDNA2 / RDNA target has fp8 conversion instructions (gfx94x has v_cvt_f32_fp8, but only for
// the FNUZ flavour and not on gfx90a), so KV-cache bytes are decoded in software: a handful of
// integer ops per byte, exact (every e4m3 value is a float). Two flavours share the bit layout
// s.eeee.mmm but not the bias nor the specials:
//   OCP e4m3fn    (kv_format 1): bias 7, NaN = s.1111.111, 0x80 = -0, max 448;
//   e4m3fnuz      (kv_format 2): bias 8, NaN = 0x80 (no negative zero), max 240 (MI300's type).
// Reading FNUZ bytes as OCP doubles every value: the scales would not fix that.
enum { KV_NATIVE = 0, KV_FP8_E4M3FN = 1, KV_FP8_E4M3FNUZ = 2 };

__device__ __forceinline__ float fp8_e4m3_to_f32(unsigned x, bool fnuz) {
    const unsigned e = (x >> 3) & 15u, m = x & 7u;
    if (fnuz ? x == 0x80u : (x & 0x7fu) == 0x7fu) return __builtin_nanf("");
    // Normal: rebias the exponent into fp32 (127 - bias) and put the 3 mantissa bits on top of
    // fp32's 23. Subnormal (e == 0): m * 2^(1 - bias - 3), exact as a float product.
    const float mag = e ? __builtin_bit_cast(float, ((e + (fnuz ? 119u : 120u)) << 23) | (m << 20))
                        : float(m) * (fnuz ? 0.0009765625f : 0.001953125f);
    return (x & 0x80u) ? -mag : mag;
}
__device__ __forceinline__ float fp8_e4m3fn_to_f32(unsigned char x) { return fp8_e4m3_to_f32(x, false); }
__device__ __forceinline__ float fp8_e4m3fnuz_to_f32(unsigned char x) { return fp8_e4m3_to_f32(x, true); }

// A KV-cache element as fp32: the element type itself, or an fp8 byte in the given kv_format.
__device__ __forceinline__ float kv_to_f32(float v, int) { return v; }
__device__ __forceinline__ float kv_to_f32(__half v, int) { return __half2float(v); }
__device__ __forceinline__ float kv_to_f32(hip_bfloat16 v, int) { return float(v); }
__device__ __forceinline__ float kv_to_f32(unsigned char v, int kv_format) { return fp8_e4m3_to_f32(v, kv_format == KV_FP8_E4M3FNUZ); }

// ------------------------------------------------------------------ wave and block reductions
// Butterfly over the whole wave: log2(warpSize) steps, 6 on wave64, 5 on wave32. The legacy
// maskless __shfl_xor is used because ROCm 5.2 has no *_sync forms; every lane of the wave is
// active at each call site (the kernels call these outside divergent branches).
__device__ __forceinline__ float wave_sum(float v) {
    for (int o = warpSize / 2; o > 0; o >>= 1) v += __shfl_xor(v, o);
    return v;
}

__device__ __forceinline__ float wave_max(float v) {
    for (int o = warpSize / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor(v, o));
    return v;
}

// Block-wide sum, result in every thread. `scratch` holds HAL_MAX_WAVES floats of LDS.
// blockDim.x must be a multiple of warpSize (every hal launch is). Each wave reduces the
// per-wave partials itself, so only two barriers are needed; the first one makes the call
// safe to repeat with the same scratch.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x % warpSize, wave = threadIdx.x / warpSize;
    const int waves = blockDim.x / warpSize;
    v = wave_sum(v);
    __syncthreads();
    if (lane == 0) scratch[wave] = v;
    __syncthreads();
    return wave_sum(lane < waves ? scratch[lane] : 0.0f);
}

__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x % warpSize, wave = threadIdx.x / warpSize;
    const int waves = blockDim.x / warpSize;
    v = wave_max(v);
    __syncthreads();
    if (lane == 0) scratch[wave] = v;
    __syncthreads();
    return wave_max(lane < waves ? scratch[lane] : -INFINITY);
}

// ------------------------------------------------------------------ activations (gemm epilogue)
enum { ACT_NONE = 0, ACT_RELU = 1, ACT_GELU = 2, ACT_GELU_TANH = 3, ACT_SILU = 4 };

__device__ __forceinline__ float silu_f32(float v) { return v / (1.0f + expf(-v)); }

__device__ __forceinline__ float activate(float v, int activation) {
    switch (activation) {
        case ACT_RELU: return fmaxf(v, 0.0f);
        case ACT_GELU: return 0.5f * v * (1.0f + erff(v * 0.70710678118654752f));
        case ACT_GELU_TANH: return 0.5f * v * (1.0f + tanhf(0.79788456080286536f * (v + 0.044715f * v * v * v)));
        case ACT_SILU: return silu_f32(v);
        default: return v;
    }
}

// ------------------------------------------------------------------ MFMA wrappers
// v_mfma_f32_32x32x8{f16,bf16_1k}, wave64, per lane (layouts in gpu-facts.md):
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
#endif
