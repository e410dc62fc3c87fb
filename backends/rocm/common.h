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

// ------------------------------------------------------------------ low-precision formats <-> fp32
// hal's conversions (hal/formats.py), in software on every target: integer operations on the fp32
// bit pattern. gfx90a and RDNA have no fp8 instructions and gfx94x's v_cvt_pk_fp8_f32 /
// v_cvt_f32_fp8 speak only FNUZ, so one software path serves every target and the emulator,
// bit for bit equal to the reference (quantize is memory-bound; the conversion is not the cost).
// Decoding is exact: every minifloat value is an fp32. Same bit layout s.eee..mm.., different
// bias and specials:
//   FP8_E4M3FN   (1): OCP,  bias 7,  no inf, NaN = s.1111.111, max 448
//   FP8_E4M3FNUZ (2): FNUZ, bias 8,  no inf, no -0, NaN = 0x80, max 240 (MI300's type);
//                     reading FNUZ bytes as OCP doubles every value, scales do not fix that
//   FP8_E5M2     (3): OCP,  bias 15, IEEE inf and NaNs, max 57344
//   e2m1 (fp4):         bias 1,  no inf, no NaN, max 6
// Encoding: round to nearest, ties to even; finite overflow and +-inf saturate to +-max
// ("satfinite"); NaN becomes the format's first NaN code (0x7F, 0x80, 0x7D; fp4: +0, the block
// scale carries the NaN); -0 is kept except in e4m3fnuz.
enum { FP8_E4M3FN = 1, FP8_E4M3FNUZ = 2, FP8_E5M2 = 3 };
enum { KV_NATIVE = 0, KV_FP8_E4M3FN = FP8_E4M3FN, KV_FP8_E4M3FNUZ = FP8_E4M3FNUZ };

// Value of a minifloat magnitude code (sign bit clear, no special value) with `mbits` mantissa
// bits: significand (hidden bit for normal codes) times the power of two of its last bit, both
// exact in fp32, so the product is exact; selects only, no branch and no fp32 subnormal.
__device__ __forceinline__ float minifloat_magnitude_to_float(unsigned mag, int mbits, int bias) {
    const unsigned e = mag >> mbits, m = mag & ((1u << mbits) - 1u);
    const unsigned significand = e ? m | (1u << mbits) : m;
    const int unit = (e ? (int)e : 1) - bias - mbits;  // >= -16 for every hal format: a normal fp32
    return (float)significand * __builtin_bit_cast(float, (unsigned)(unit + 127) << 23);
}

// `value` shifted right by `shift` bits, rounded to nearest, ties to even (value < 2^31).
__device__ __forceinline__ unsigned shift_right_rne(unsigned value, unsigned shift) {
    if (shift == 0) return value;
    const unsigned kept = value >> shift, rest = value & ((1u << shift) - 1u), half = 1u << (shift - 1);
    return kept + (rest > half || (rest == half && (kept & 1u)));
}

// Magnitude code of |x| (`abs_bits`: fp32 bits with the sign cleared, not NaN) in a minifloat
// with `mbits` mantissa bits and exponent `bias`, rounded to nearest even and saturated to
// `max_code` (the code of +max; +inf lands there too).
__device__ __forceinline__ unsigned minifloat_magnitude_from_bits(unsigned abs_bits, int mbits, int bias, unsigned max_code) {
    const unsigned e = abs_bits >> 23;
    unsigned code;
    if (int(e) >= 128 - bias) {
        // Normal in the target: rebias the exponent in place, drop 23 - mbits mantissa bits; a
        // carry out of the mantissa bumps the exponent, as it should.
        code = shift_right_rne(abs_bits - (unsigned(127 - bias) << 23), 23 - mbits);
    } else {
        // Subnormal in the target: count units of 2^(1 - bias - mbits). The significand (hidden
        // bit included) has 24 bits, so shifting by 25 or more rounds to 0; fp32 subnormals have
        // exponent field 0 but scale like 1.
        const unsigned significand = e ? (abs_bits & 0x7FFFFFu) | 0x800000u : abs_bits;
        const unsigned shift = unsigned(151 - bias - mbits) - (e ? e : 1u);
        code = shift_right_rne(significand, shift < 25u ? shift : 25u);
    }
    return code < max_code ? code : max_code;
}

__device__ __forceinline__ float fp8_to_float(unsigned code, int format) {
    code &= 0xFFu;
    const unsigned mag = code & 0x7Fu;
    const bool e5m2 = format == FP8_E5M2, fnuz = format == FP8_E4M3FNUZ;
    float v = minifloat_magnitude_to_float(mag, e5m2 ? 2 : 3, e5m2 ? 15 : fnuz ? 8 : 7);
    if (e5m2 && mag == 0x7Cu) v = INFINITY;
    v = (code & 0x80u) ? -v : v;
    const bool is_nan = fnuz ? code == 0x80u : mag > (e5m2 ? 0x7Cu : 0x7Eu);
    return is_nan ? __builtin_nanf("") : v;
}

__device__ __forceinline__ float e2m1_to_float(unsigned nibble) {
    const float v = minifloat_magnitude_to_float(nibble & 7u, 1, 1);
    return (nibble & 8u) ? -v : v;
}

// E8M0 block scale (OCP MX): 2^(code - 127); code 0 is the fp32 subnormal 2^-127; 0xFF is NaN.
__device__ __forceinline__ float e8m0_to_float(unsigned code) {
    code &= 0xFFu;
    return __builtin_bit_cast(float, code == 0xFFu ? 0x7FC00000u : code == 0u ? 0x00400000u : code << 23);
}

__device__ __forceinline__ int int4_to_int(unsigned nibble) { return int(nibble & 7u) - int(nibble & 8u); }

__device__ __forceinline__ unsigned float_to_fp8(float x, int format) {
    const unsigned bits = __builtin_bit_cast(unsigned, x), abs_bits = bits & 0x7FFFFFFFu, sign = (bits >> 24) & 0x80u;
    if (abs_bits > 0x7F800000u) return format == FP8_E4M3FNUZ ? 0x80u : format == FP8_E5M2 ? 0x7Du : 0x7Fu;
    if (format == FP8_E5M2) return sign | minifloat_magnitude_from_bits(abs_bits, 2, 15, 0x7Bu);
    if (format == FP8_E4M3FN) return sign | minifloat_magnitude_from_bits(abs_bits, 3, 7, 0x7Eu);
    const unsigned mag = minifloat_magnitude_from_bits(abs_bits, 3, 8, 0x7Fu);
    return mag ? sign | mag : 0u;  // FNUZ: 0x80 is the NaN, so every zero is +0
}

__device__ __forceinline__ unsigned float_to_e2m1(float x) {
    const unsigned bits = __builtin_bit_cast(unsigned, x), abs_bits = bits & 0x7FFFFFFFu;
    if (abs_bits > 0x7F800000u) return 0u;
    return ((bits >> 28) & 8u) | minifloat_magnitude_from_bits(abs_bits, 1, 1, 7u);
}

// KV-cache fp8 bytes (kv_format 1 / 2): fp8_to_float for the two e4m3 formats only, so that the
// decode loops do not carry e5m2's cases.
__device__ __forceinline__ float fp8_e4m3_to_f32(unsigned x, bool fnuz) {
    const float mag = minifloat_magnitude_to_float(x & 0x7Fu, 3, fnuz ? 8 : 7);
    if (fnuz ? x == 0x80u : (x & 0x7Fu) == 0x7Fu) return __builtin_nanf("");
    return (x & 0x80u) ? -mag : mag;
}

// A KV-cache element as fp32: the element type itself, or an fp8 byte in the given kv_format.
__device__ __forceinline__ float kv_to_f32(float v, int) { return v; }
__device__ __forceinline__ float kv_to_f32(__half v, int) { return __half2float(v); }
__device__ __forceinline__ float kv_to_f32(hip_bfloat16 v, int) { return float(v); }
__device__ __forceinline__ float kv_to_f32(unsigned char v, int kv_format) { return fp8_e4m3_to_f32(v, kv_format == KV_FP8_E4M3FNUZ); }

// 4 consecutive elements (T or KV-cache bytes) as fp32; `vec` when the address is 4-element aligned (one 16 /
// 8 / 4-byte load), otherwise element by element; elements at or past `n` read as 0.
template <typename C> struct Load4;
template <> struct Load4<float> {
    typedef float4 raw;
    static __device__ __forceinline__ void f32(const raw& v, float o[4], int) { o[0] = v.x, o[1] = v.y, o[2] = v.z, o[3] = v.w; }
};
template <> struct Load4<__half> {
    typedef uint2 raw;
    static __device__ __forceinline__ void f32(const raw& v, float o[4], int) {
        __half h[4];
        __builtin_memcpy(h, &v, sizeof(v));
        for (int e = 0; e < 4; ++e) o[e] = __half2float(h[e]);
    }
};
template <> struct Load4<hip_bfloat16> {
    typedef uint2 raw;
    static __device__ __forceinline__ void f32(const raw& v, float o[4], int) {
        o[0] = __builtin_bit_cast(float, v.x << 16), o[1] = __builtin_bit_cast(float, v.x & 0xffff0000u);
        o[2] = __builtin_bit_cast(float, v.y << 16), o[3] = __builtin_bit_cast(float, v.y & 0xffff0000u);
    }
};
template <> struct Load4<unsigned char> {
    typedef unsigned raw;
    static __device__ __forceinline__ void f32(const raw& v, float o[4], int fmt) {
        for (int e = 0; e < 4; ++e) o[e] = kv_to_f32((unsigned char)(v >> (8 * e)), fmt);
    }
};

template <typename C>
__device__ __forceinline__ void load4(const C* p, int n, bool vec, int fmt, float o[4]) {
    if (vec && n >= 4) {
        Load4<C>::f32(*reinterpret_cast<const typename Load4<C>::raw*>(p), o, fmt);
    } else {
        for (int e = 0; e < 4; ++e) o[e] = e < n ? kv_to_f32(p[e], fmt) : 0.0f;
    }
}

template <typename C>
__device__ __forceinline__ bool aligned4(const C* p) {
    return (reinterpret_cast<unsigned long long>(p) & (4 * sizeof(C) - 1)) == 0;
}

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

// ================================================================ expert row tiles (grouped GEMMs)
// Which rows of x / a a block owns. Plain GEMMs (offsets == nullptr): tile blockIdx.x of `BM`
// rows, expert 0. Grouped GEMMs: expert e owns rows [offsets[e], offsets[e + 1]), its segment is
// cut into BM-row tiles numbered in expert order, then come the tiles of the rows no expert owns
// (before offsets[0], from offsets[E]), which the block writes as zeros (expert -1). Offsets are
// clamped into [0, R] so that bad device data cannot send a tile out of bounds. Grid bound: with L
// rows covered the expert tiles number at most (L + (BM - 1) E) / BM and the zero tiles at most
// (R - L + 2 (BM - 1)) / BM, together < R / BM + E + 2, so grid.x = ceil(R / BM) + E + 1 covers
// both; the blocks past them get rows <= 0 and exit.
struct RowTile {
    int row0, rows, expert;  // rows <= 0: no work; expert -1: rows [row0, row0 + rows) are zeros
};

// Wave 0 scans the experts warpSize (64 on CDNA, 32 on RDNA) at a time with a shuffle prefix sum
// of their tile counts, no LDS scratch and no barrier per chunk; the lane whose expert holds this
// block's tile publishes it in *lds_tile. Every thread must call it (one barrier).
template <int BM>
__device__ __forceinline__ RowTile expert_row_tile(const int* __restrict__ offsets, int experts, int R, RowTile* lds_tile) {
    const int tile = blockIdx.x;
    if (!offsets) return RowTile{tile * BM, min(BM, R - tile * BM), 0};
    if ((int)threadIdx.x < warpSize) {
        const int lane = threadIdx.x;
        int before = 0;  // expert tiles of the chunks already scanned
        for (int base = 0; base < experts; base += warpSize) {
            const int e = base + lane;
            int start = 0, end = 0;
            if (e < experts) {
                start = min(max(offsets[e], 0), R);
                end = min(max(offsets[e + 1], start), R);
            }
            const int tiles = (end - start + BM - 1) / BM;
            int inclusive = tiles;
            for (int d = 1; d < warpSize; d <<= 1) {
                const int below = __shfl(inclusive, lane - d);
                if (lane >= d) inclusive += below;
            }
            const int first = before + inclusive - tiles;
            if (tile >= first && tile < first + tiles) {
                const int row0 = start + (tile - first) * BM;
                *lds_tile = RowTile{row0, min(BM, end - row0), e};
            }
            before += __shfl(inclusive, warpSize - 1);
        }
        if (lane == 0 && tile >= before) {  // a zero tile: first the rows before offsets[0], then from offsets[E]
            const int lo = min(max(offsets[0], 0), R), hi = min(max(offsets[experts], lo), R);
            const int z = tile - before, head = (lo + BM - 1) / BM;
            const int row0 = z < head ? z * BM : hi + (z - head) * BM;
            *lds_tile = RowTile{row0, min(BM, (z < head ? lo : R) - row0), -1};
        }
    }
    __syncthreads();
    return *lds_tile;
}

// Zeros of a zero tile: its rows x output columns [c0, c0 + cols) (clipped at n_out).
template <typename T>
__device__ __forceinline__ void zero_rows(T* __restrict__ out, const RowTile& tile, int c0, int cols, int n_out) {
    cols = min(cols, n_out - c0);
    for (int i = threadIdx.x; i < tile.rows * cols; i += blockDim.x)
        out[(long long)(tile.row0 + i / cols) * n_out + c0 + i % cols] = from_f32<T>(0.0f);
}

// A block's weight rows ("positions") start at output column c0. Plain: position p is column
// c0 + p. Gated (silu_and_mul): p is the gate row (p even) or the up row (p odd, n_out further on)
// of column c0 + p / 2. The expert-local weight row of position p, or -1 past the last column:
__device__ __forceinline__ int weight_row(int p, int c0, int n_out, int gated) {
    const int col = c0 + (gated ? p >> 1 : p);
    return col >= n_out ? -1 : (gated && (p & 1) ? n_out + col : col);
}

// The fp32 accumulators of positions p, p + 1 (p even) of one output row: two columns, or (gated)
// silu(gate) * up of one column, rounded once to T.
template <typename T>
__device__ __forceinline__ void store_pair(T* __restrict__ out_row, int n_out, int c0, int p, float v0, float v1, int gated) {
    if (gated) {
        if (c0 + p / 2 < n_out) out_row[c0 + p / 2] = from_f32<T>(silu_f32(v0) * v1);
    } else {
        if (c0 + p < n_out) out_row[c0 + p] = from_f32<T>(v0);
        if (c0 + p + 1 < n_out) out_row[c0 + p + 1] = from_f32<T>(v1);
    }
}
