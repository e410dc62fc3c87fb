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

// ---------------------------------------------------------------- fp8 (KV caches)
// fp8 bytes -> fp32 in software (exact: every e4m3 value is a small integer times a power of two),
// so the same code runs on sm_80 (no fp8 hardware), on Hopper / Blackwell, and in the emulator.
//   format 1: OCP e4m3fn   bias 7, no inf, NaN = S.1111.111, subnormals m * 2^-9
//   format 2: e4m3fnuz     bias 8, no inf, no -0, NaN = 0x80 only, subnormals m * 2^-10
// value = (8 + m) * 2^e * 2^-(bias + 3) for a normal (e >= 1), m * 2 * 2^-(bias + 3) for a
// subnormal (e == 0): both factors exact, so the product is exact.
#define HAL_FP8_E4M3FN 1
#define HAL_FP8_E4M3FNUZ 2

__device__ __forceinline__ float fp8_e4m3_to_float(unsigned v, int format) {
    const bool fnuz = format == HAL_FP8_E4M3FNUZ;
    const unsigned e = (v >> 3) & 0xFu, m = v & 0x7u;
    if (fnuz ? v == 0x80u : (v & 0x7Fu) == 0x7Fu) return 0.0f * INFINITY;  // the format's NaN
    const float unit = fnuz ? 0.0009765625f : 0.001953125f;  // 2^-(bias + 3) * 2: 2^-10 / 2^-9
    const float mag = e == 0 ? (float)m * unit : (float)(8u + m) * (float)(1u << e) * (0.5f * unit);
    return (v & 0x80u) ? -mag : mag;
}

// A cache element of type C as fp32: T widened, or an fp8 byte decoded (format 1 / 2).
__device__ __forceinline__ float cache_to_float(float x, int) { return x; }
__device__ __forceinline__ float cache_to_float(__half x, int) { return __half2float(x); }
__device__ __forceinline__ float cache_to_float(__nv_bfloat16 x, int) { return __bfloat162float(x); }
__device__ __forceinline__ float cache_to_float(unsigned char x, int format) { return fp8_e4m3_to_float(x, format); }

// ---------------------------------------------------------------- 8-element chunks (attention, decode)
// Eight consecutive elements of a row, widened to fp32: one 16-byte load for 16-bit types, two for
// float, one 8-byte load for fp8 bytes when `vec` (the caller checked that the chunk is aligned:
// base pointer and row length), else element by element; elements at or past `valid` read as 0.
__device__ __forceinline__ void load8_float(const float* p, int valid, bool vec, int, float out[8]) {
    if (vec && valid >= 8) {
        const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
        out[0] = a.x; out[1] = a.y; out[2] = a.z; out[3] = a.w;
        out[4] = b.x; out[5] = b.y; out[6] = b.z; out[7] = b.w;
    } else {
        for (int e = 0; e < 8; ++e) out[e] = e < valid ? p[e] : 0.0f;
    }
}

template <typename T>
__device__ __forceinline__ void load8_float16(const T* p, int valid, bool vec, float out[8]) {
    if (vec && valid >= 8) {
        const uint4 u = *reinterpret_cast<const uint4*>(p);
        const T* e = reinterpret_cast<const T*>(&u);
        for (int i = 0; i < 8; ++i) out[i] = to_float(e[i]);
    } else {
        for (int i = 0; i < 8; ++i) out[i] = i < valid ? to_float(p[i]) : 0.0f;
    }
}
__device__ __forceinline__ void load8_float(const __half* p, int valid, bool vec, int, float out[8]) { load8_float16(p, valid, vec, out); }
__device__ __forceinline__ void load8_float(const __nv_bfloat16* p, int valid, bool vec, int, float out[8]) { load8_float16(p, valid, vec, out); }

__device__ __forceinline__ void load8_float(const unsigned char* p, int valid, bool vec, int format, float out[8]) {
    if (vec && valid >= 8) {
        const uint2 u = *reinterpret_cast<const uint2*>(p);
        for (int i = 0; i < 4; ++i) out[i] = fp8_e4m3_to_float((u.x >> (8 * i)) & 0xFFu, format);
        for (int i = 0; i < 4; ++i) out[4 + i] = fp8_e4m3_to_float((u.y >> (8 * i)) & 0xFFu, format);
    } else {
        for (int i = 0; i < 8; ++i) out[i] = i < valid ? fp8_e4m3_to_float(p[i], format) : 0.0f;
    }
}

// Whether 8-element chunks of rows `row_elems` long, starting at `base`, are all aligned for the
// vector path of load8_float (16 bytes for float / 16-bit types, 8 bytes for fp8).
template <typename C>
__device__ __forceinline__ bool chunks_aligned(const C* base, int row_elems) {
    const unsigned bytes = sizeof(C) == 1 ? 8u : 16u;
    return (unsigned long long)row_elems * sizeof(C) % bytes == 0 && reinterpret_cast<unsigned long long>(base) % bytes == 0;
}
