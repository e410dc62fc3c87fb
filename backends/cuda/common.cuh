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

// m16n8k32 with 8-bit inputs: A 4 x b32 (16 bytes), B 2 x b32 (8 bytes), C/D as m16n8k16; lowest
// byte first. e4m3 (OCP e4m3fn) inputs need sm_89+ (the glue instantiates its callers there only);
// s8 inputs with exact s32 accumulation exist from sm_80.
__device__ __forceinline__ void mma_m16n8k32_e4m3(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
}

__device__ __forceinline__ void mma_m16n8k32_s8(int d[4], const unsigned a[4], const unsigned b[2], const int c[4]) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%10, %11, %12, %13};\n"
        : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(c[0]), "r"(c[1]), "r"(c[2]), "r"(c[3]));
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

// ---------------------------------------------------------------- low-precision formats <-> fp32
// hal's conversions (hal/formats.py), in software on every architecture: integer operations on the
// fp32 bit pattern, so sm_80 (no fp8 hardware), Hopper / Blackwell and the emulator run one code
// path and agree bit for bit with the reference. (sm_89+ has cvt.rn.satfinite.e4m3x2.f32, but no
// conversion for e4m3fnuz and e2m1 only from sm_100a; the conversions are far from the bottleneck
// of a memory-bound quantize.) Decoding is exact: every minifloat value is an fp32.
//   fp8 format 1: OCP e4m3fn  bias 7,  no inf, NaN = S.1111.111, max 448
//   fp8 format 2: e4m3fnuz    bias 8,  no inf, no -0, NaN = 0x80, max 240 (MI300's FNUZ)
//   fp8 format 3: OCP e5m2    bias 15, IEEE inf and NaNs, max 57344
//   e2m1 (fp4):               bias 1,  no inf, no NaN, max 6
// Encoding: round to nearest, ties to even; finite overflow and +-inf saturate to +-max
// ("satfinite"); NaN becomes the format's first NaN code (0x7F, 0x80, 0x7D; fp4: +0, the block
// scale carries the NaN); -0 is kept except in e4m3fnuz.
#define HAL_FP8_E4M3FN 1
#define HAL_FP8_E4M3FNUZ 2
#define HAL_FP8_E5M2 3

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

// Magnitude code of |x| (`abs_bits` = fp32 bits with the sign cleared, not NaN) in a minifloat
// with `mbits` mantissa bits and exponent `bias`, rounded to nearest even and saturated to
// `max_code` (the code of +max; +inf lands there too).
__device__ __forceinline__ unsigned minifloat_magnitude_from_bits(unsigned abs_bits, int mbits, int bias, unsigned max_code) {
    const unsigned e = abs_bits >> 23;
    unsigned code;
    if ((int)e >= 128 - bias) {
        // Normal in the target: rebias the exponent in place, then drop 23 - mbits mantissa bits;
        // a carry out of the mantissa bumps the exponent, as it should.
        code = shift_right_rne(abs_bits - ((unsigned)(127 - bias) << 23), 23 - mbits);
    } else {
        // Subnormal in the target: count units of 2^(1 - bias - mbits). The significand (hidden
        // bit included) is 24 bits, so a shift of 25 or more rounds to 0; fp32 subnormals have
        // exponent field 0 but scale like 1.
        const unsigned significand = e ? (abs_bits & 0x7FFFFFu) | 0x800000u : abs_bits;
        const unsigned shift = (unsigned)(151 - bias - mbits) - (e ? e : 1u);
        code = shift_right_rne(significand, shift < 25u ? shift : 25u);
    }
    return code < max_code ? code : max_code;
}

__device__ __forceinline__ float fp8_to_float(unsigned code, int format) {
    code &= 0xFFu;
    const unsigned mag = code & 0x7Fu;
    const bool e5m2 = format == HAL_FP8_E5M2, fnuz = format == HAL_FP8_E4M3FNUZ;
    float v = minifloat_magnitude_to_float(mag, e5m2 ? 2 : 3, e5m2 ? 15 : fnuz ? 8 : 7);
    if (e5m2 && mag == 0x7Cu) v = INFINITY;
    v = (code & 0x80u) ? -v : v;
    const bool is_nan = fnuz ? code == 0x80u : mag > (e5m2 ? 0x7Cu : 0x7Eu);
    return is_nan ? __builtin_bit_cast(float, 0x7FC00000u) : v;
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

__device__ __forceinline__ int int4_to_int(unsigned nibble) { return (int)(nibble & 7u) - (int)(nibble & 8u); }

__device__ __forceinline__ unsigned float_to_fp8(float x, int format) {
    const unsigned bits = __builtin_bit_cast(unsigned, x), abs_bits = bits & 0x7FFFFFFFu, sign = (bits >> 24) & 0x80u;
    if (abs_bits > 0x7F800000u) return format == HAL_FP8_E4M3FNUZ ? 0x80u : format == HAL_FP8_E5M2 ? 0x7Du : 0x7Fu;
    if (format == HAL_FP8_E5M2) return sign | minifloat_magnitude_from_bits(abs_bits, 2, 15, 0x7Bu);
    if (format == HAL_FP8_E4M3FN) return sign | minifloat_magnitude_from_bits(abs_bits, 3, 7, 0x7Eu);
    const unsigned mag = minifloat_magnitude_from_bits(abs_bits, 3, 8, 0x7Fu);
    return mag ? sign | mag : 0u;  // FNUZ: 0x80 is the NaN, so every zero is +0
}

__device__ __forceinline__ unsigned float_to_e2m1(float x) {
    const unsigned bits = __builtin_bit_cast(unsigned, x), abs_bits = bits & 0x7FFFFFFFu;
    if (abs_bits > 0x7F800000u) return 0u;
    return ((bits >> 28) & 8u) | minifloat_magnitude_from_bits(abs_bits, 1, 1, 7u);
}

// KV-cache fp8 bytes: fp8_to_float for the two e4m3 formats only (1 and 2), so that the decode
// loops do not carry e5m2's cases.
__device__ __forceinline__ float fp8_e4m3_to_float(unsigned v, int format) {
    const bool fnuz = format == HAL_FP8_E4M3FNUZ;
    const float mag = minifloat_magnitude_to_float(v & 0x7Fu, 3, fnuz ? 8 : 7);
    if (fnuz ? v == 0x80u : (v & 0x7Fu) == 0x7Fu) return __builtin_bit_cast(float, 0x7FC00000u);
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

// Eight consecutive 16-bit elements as one uint4, the first `valid` of them from p, the rest zero
// (zero bits are +0.0 in f16 and bf16): the scalar path for tails and unaligned rows.
__device__ __forceinline__ uint4 load8_bits(const unsigned short* p, int valid) {
    unsigned w[4] = {0u, 0u, 0u, 0u};
    for (int e = 0; e < 8; ++e)
        if (e < valid) w[e >> 1] |= (unsigned)p[e] << (16 * (e & 1));
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// Whether 8-element chunks of rows `row_elems` long, starting at `base`, are all aligned for the
// vector path of load8_float (16 bytes for float / 16-bit types, 8 bytes for fp8).
template <typename C>
__device__ __forceinline__ bool chunks_aligned(const C* base, int row_elems) {
    const unsigned bytes = sizeof(C) == 1 ? 8u : 16u;
    return (unsigned long long)row_elems * sizeof(C) % bytes == 0 && reinterpret_cast<unsigned long long>(base) % bytes == 0;
}

// ================================================================ expert row tiles (grouped GEMMs)
// Which rows of x / a a block owns. Plain GEMMs (offsets == nullptr): tile blockIdx.x of
// `BM` rows, expert 0. Grouped GEMMs: expert e owns rows [offsets[e], offsets[e + 1]), its segment
// is cut into BM-row tiles numbered in expert order, then come the tiles of the rows no expert owns
// (before offsets[0], from offsets[E]), which the block writes as zeros (expert -1). Offsets are
// clamped into [0, R] so that bad device data cannot send a tile out of bounds. Grid bound: with L
// rows covered the expert tiles number at most (L + (BM - 1) E) / BM and the zero tiles at most
// (R - L + 2 (BM - 1)) / BM, together < R / BM + E + 2, so grid.x = ceil(R / BM) + E + 1 covers
// both; the blocks past them get rows <= 0 and exit.
struct RowTile {
    int row0, rows, expert;  // rows <= 0: no work; expert -1: rows [row0, row0 + rows) are zeros
};

// Warp 0 scans the experts 32 at a time (shuffle prefix sum of their tile counts); the lane whose
// expert holds this block's tile publishes it in *shared_tile. Every thread must call it (barrier).
template <int BM>
__device__ __forceinline__ RowTile expert_row_tile(const int* __restrict__ offsets, int experts, int R, RowTile* shared_tile) {
    const int tile = blockIdx.x;
    if (!offsets) return RowTile{tile * BM, min(BM, R - tile * BM), 0};
    if (threadIdx.x < warpSize) {
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
                const int below = __shfl_sync(0xffffffffu, inclusive, lane - d);
                if (lane >= d) inclusive += below;
            }
            const int first = before + inclusive - tiles;
            if (tile >= first && tile < first + tiles) {
                const int row0 = start + (tile - first) * BM;
                *shared_tile = RowTile{row0, min(BM, end - row0), e};
            }
            before += __shfl_sync(0xffffffffu, inclusive, warpSize - 1);
        }
        if (lane == 0 && tile >= before) {  // a zero tile: first the rows before offsets[0], then from offsets[E]
            const int lo = min(max(offsets[0], 0), R), hi = min(max(offsets[experts], lo), R);
            const int z = tile - before, head = (lo + BM - 1) / BM;
            const int row0 = z < head ? z * BM : hi + (z - head) * BM;
            *shared_tile = RowTile{row0, min(BM, (z < head ? lo : R) - row0), -1};
        }
    }
    __syncthreads();
    return *shared_tile;
}

// Zeros of a zero tile: its rows x output columns [c0, c0 + cols) (clipped at n_out).
template <typename T>
__device__ __forceinline__ void zero_rows(T* __restrict__ out, const RowTile& tile, int c0, int cols, int n_out) {
    cols = min(cols, n_out - c0);
    for (int i = threadIdx.x; i < tile.rows * cols; i += blockDim.x)
        out[(long long)(tile.row0 + i / cols) * n_out + c0 + i % cols] = from_float<T>(0.0f);
}

// A block's weight rows ("positions") start at output column c0. Plain: position p is column
// c0 + p. Gated (silu_and_mul): p is the gate row (p even) or the up row (p odd, n_out further on)
// of column c0 + p / 2, so the pairs (p, p + 1) a thread accumulates combine in registers.
// The expert-local weight row of position p, or -1 past the last output column:
__device__ __forceinline__ int weight_row(int p, int c0, int n_out, int gated) {
    const int col = c0 + (gated ? p >> 1 : p);
    return col >= n_out ? -1 : (gated && (p & 1) ? n_out + col : col);
}

// The fp32 accumulators of positions p, p + 1 (p even) of one output row: two columns, or (gated)
// silu(gate) * up of one column, rounded once to T.
template <typename T>
__device__ __forceinline__ void store_pair(T* __restrict__ out_row, int n_out, int c0, int p, float v0, float v1, int gated) {
    if (gated) {
        if (c0 + p / 2 < n_out) out_row[c0 + p / 2] = from_float<T>(silu(v0) * v1);
    } else {
        if (c0 + p < n_out) out_row[c0 + p] = from_float<T>(v0);
        if (c0 + p + 1 < n_out) out_row[c0 + p + 1] = from_float<T>(v1);
    }
}
