// Vendor-neutral vocabulary of hal's GPU kernels, included by every kernel file (shared and vendor):
// element conversions, warp and block reductions, the epilogue activations, the low-precision
// codecs, chunk loads, the register-prefetch main loop and the grouped-GEMM row tiles (plain,
// contiguous and masked layouts).
//
// Written once on the vendor shim "hal_vendor.h" (backends/cuda or backends/rocm, found through the
// include path): its element type names, shuffles and matrix wrappers. Integer codes (HAL_ACT_*,
// HAL_FMT_*, HAL_BAG_*, HAL_ROUTE_*) come as -D options from hal/codes.py, never from here. Kernel
// code uses only what docs/gpu-kernels.md lists, so that the host emulator (backends/sim, HAL_SIM)
// runs it unchanged.
#pragma once
#include "hal_vendor.h"

#if !defined(HAL_ACT_NONE) || !defined(HAL_FMT_FP8_E4M3FN) || !defined(HAL_BAG_SUM) || !defined(HAL_ROUTE_SOFTMAX)
#error "kernel codes missing: compile with hal.codes.define_options() (-DHAL_ACT_NONE=0 ...)"
#endif

// ---------------------------------------------------------------- element types <-> fp32
// Every kernel computes in fp32: T is widened on load and rounded (to nearest even) on store.

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return half_to_float(x); }
__device__ __forceinline__ float to_float(bf16 x) { return bf16_to_float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return float_to_half(x); }
template <> __device__ __forceinline__ bf16 from_float<bf16>(float x) { return float_to_bf16(x); }

// A 16-bit element from its bits (the low 16 of `bits`) as fp32: integer work on a register, never
// an array of 16-bit structs (which clang would keep in scratch memory).
template <typename T> __device__ __forceinline__ float bits16_to_float(unsigned bits);
template <> __device__ __forceinline__ float bits16_to_float<__half>(unsigned bits) { return half_to_float(__builtin_bit_cast(__half, (unsigned short)bits)); }
template <> __device__ __forceinline__ float bits16_to_float<bf16>(unsigned bits) { return __builtin_bit_cast(float, bits << 16); }

// ---------------------------------------------------------------- reductions
// Warp level with butterfly shuffles (every lane ends with the result: log2(warpSize) steps, 5 on
// NVIDIA and RDNA, 6 on CDNA), then one pass through shared memory across the warps of the block.
// Loops start at warpSize / 2, never at a literal.

__device__ __forceinline__ float warp_sum(float v) {
    for (int offset = warpSize / 2; offset > 0; offset >>= 1) v += warp_shfl_xor(v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int offset = warpSize / 2; offset > 0; offset >>= 1) v = fmaxf(v, warp_shfl_xor(v, offset));
    return v;
}

// Room for the per-warp partials of the largest block (1024 threads / 32 lanes); a block uses only
// its first blockDim.x / warpSize entries.
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

// Inclusive prefix sum over the warp, in lane order (Hillis-Steele with shuffles; lanes below the
// distance keep their value).
__device__ __forceinline__ int warp_inclusive_scan(int v) {
    const int lane = threadIdx.x % warpSize;
    for (int d = 1; d < warpSize; d <<= 1) {
        const int below = warp_shfl(v, lane - d);
        if (lane >= d) v += below;
    }
    return v;
}

// ---------------------------------------------------------------- activations (epilogue codes)
// Codes from hal/codes.py (HAL_ACT_*). A gated epilogue is activate(gate, code) * up.
// NaN propagates as in torch: relu(NaN) is NaN, and fmaxf(NaN, 0) is 0, hence the NaN test first
// (rather than x < 0 ? 0 : x, which costs gemm_simt<float> a spill on sm_90a).

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }  // -> -0 for x << 0, no NaN

__device__ __forceinline__ float activate(float x, int activation) {
    switch (activation) {
        case HAL_ACT_RELU: return x != x ? x : fmaxf(x, 0.0f);
        case HAL_ACT_GELU: return 0.5f * x * (1.0f + erff(x * 0.70710678118654752f));  // exact, erf form
        case HAL_ACT_GELU_TANH: return 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
        case HAL_ACT_SILU: return silu(x);
        default: return x;
    }
}

// ---------------------------------------------------------------- low-precision formats <-> fp32
// hal's conversions (hal/formats.py), in software on every architecture: integer operations on the
// fp32 bit pattern, so every target and the emulator run one code path and agree bit for bit with
// the reference (hardware conversions cover only some formats on some archs: docs/hardware.md; the
// conversions are far from the bottleneck of a memory-bound quantize). Decoding is exact: every
// minifloat value is an fp32.
//   HAL_FMT_FP8_E4M3FN:   OCP e4m3fn  bias 7,  no inf, NaN = S.1111.111, max 448
//   HAL_FMT_FP8_E4M3FNUZ: e4m3fnuz    bias 8,  no inf, no -0, NaN = 0x80, max 240 (MI300's FNUZ)
//   HAL_FMT_FP8_E5M2:     OCP e5m2    bias 15, IEEE inf and NaNs, max 57344
//   e2m1 (fp4):                       bias 1,  no inf, no NaN, max 6
// Encoding: round to nearest, ties to even; finite overflow and +-inf saturate to +-max
// ("satfinite"); NaN becomes the format's first NaN code (0x7F, 0x80, 0x7D; fp4: +0, the block
// scale carries the NaN); -0 is kept except in e4m3fnuz.

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

#define HAL_QUIET_NAN __builtin_bit_cast(float, 0x7FC00000u)

__device__ __forceinline__ float fp8_to_float(unsigned code, int format) {
    code &= 0xFFu;
    const unsigned mag = code & 0x7Fu;
    const bool e5m2 = format == HAL_FMT_FP8_E5M2, fnuz = format == HAL_FMT_FP8_E4M3FNUZ;
    float v = minifloat_magnitude_to_float(mag, e5m2 ? 2 : 3, e5m2 ? 15 : fnuz ? 8 : 7);
    if (e5m2 && mag == 0x7Cu) v = INFINITY;
    v = (code & 0x80u) ? -v : v;
    const bool is_nan = fnuz ? code == 0x80u : mag > (e5m2 ? 0x7Cu : 0x7Eu);
    return is_nan ? HAL_QUIET_NAN : v;
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
    if (abs_bits > 0x7F800000u) return format == HAL_FMT_FP8_E4M3FNUZ ? 0x80u : format == HAL_FMT_FP8_E5M2 ? 0x7Du : 0x7Fu;
    if (format == HAL_FMT_FP8_E5M2) return sign | minifloat_magnitude_from_bits(abs_bits, 2, 15, 0x7Bu);
    if (format == HAL_FMT_FP8_E4M3FN) return sign | minifloat_magnitude_from_bits(abs_bits, 3, 7, 0x7Eu);
    const unsigned mag = minifloat_magnitude_from_bits(abs_bits, 3, 8, 0x7Fu);
    return mag ? sign | mag : 0u;  // FNUZ: 0x80 is the NaN, so every zero is +0
}

__device__ __forceinline__ unsigned float_to_e2m1(float x) {
    const unsigned bits = __builtin_bit_cast(unsigned, x), abs_bits = bits & 0x7FFFFFFFu;
    if (abs_bits > 0x7F800000u) return 0u;
    return ((bits >> 28) & 8u) | minifloat_magnitude_from_bits(abs_bits, 1, 1, 7u);
}

// KV-cache fp8 bytes: fp8_to_float for the two e4m3 formats only (HAL_FMT_FP8_E4M3FN /
// HAL_FMT_FP8_E4M3FNUZ), so that the decode loops do not carry e5m2's cases.
__device__ __forceinline__ float fp8_e4m3_to_float(unsigned v, int format) {
    const bool fnuz = format == HAL_FMT_FP8_E4M3FNUZ;
    const float mag = minifloat_magnitude_to_float(v & 0x7Fu, 3, fnuz ? 8 : 7);
    if (fnuz ? v == 0x80u : (v & 0x7Fu) == 0x7Fu) return HAL_QUIET_NAN;
    return (v & 0x80u) ? -mag : mag;
}

// A cache element of type C as fp32: T widened, or an fp8 byte decoded (format: an e4m3 code; 0
// when the cache holds T itself).
__device__ __forceinline__ float cache_to_float(float x, int) { return x; }
__device__ __forceinline__ float cache_to_float(__half x, int) { return half_to_float(x); }
__device__ __forceinline__ float cache_to_float(bf16 x, int) { return bf16_to_float(x); }
__device__ __forceinline__ float cache_to_float(unsigned char x, int format) { return fp8_e4m3_to_float(x, format); }

// ---------------------------------------------------------------- chunk loads
// N consecutive elements of a row (T or fp8 cache bytes), widened to fp32: one vector load when
// `vec` (the caller checked that the chunk is aligned: base pointer and row length) and the chunk
// is whole, else element by element; elements at or past `valid` read as 0. 8-element chunks are
// 16 bytes of a 16-bit type; 4-element chunks 8 bytes.

// The vector path of one chunk, per cache type and width.
template <typename C, int N> struct ChunkLoad;
template <> struct ChunkLoad<float, 8> {
    static __device__ __forceinline__ void load(const float* p, int, float o[8]) {
        const float4 a = reinterpret_cast<const float4*>(p)[0], b = reinterpret_cast<const float4*>(p)[1];
        o[0] = a.x, o[1] = a.y, o[2] = a.z, o[3] = a.w, o[4] = b.x, o[5] = b.y, o[6] = b.z, o[7] = b.w;
    }
};
template <> struct ChunkLoad<float, 4> {
    static __device__ __forceinline__ void load(const float* p, int, float o[4]) {
        const float4 a = *reinterpret_cast<const float4*>(p);
        o[0] = a.x, o[1] = a.y, o[2] = a.z, o[3] = a.w;
    }
};
template <typename T> struct Words16 {  // __half, bf16
    static __device__ __forceinline__ void words(const unsigned* w, int n, float* o) {
        for (int i = 0; i < n; ++i) o[i] = bits16_to_float<T>(w[i >> 1] >> (16 * (i & 1)));
    }
};
template <> struct ChunkLoad<__half, 8> {
    static __device__ __forceinline__ void load(const __half* p, int, float o[8]) {
        const uint4 u = *reinterpret_cast<const uint4*>(p);
        const unsigned w[4] = {u.x, u.y, u.z, u.w};
        Words16<__half>::words(w, 8, o);
    }
};
template <> struct ChunkLoad<bf16, 8> {
    static __device__ __forceinline__ void load(const bf16* p, int, float o[8]) {
        const uint4 u = *reinterpret_cast<const uint4*>(p);
        const unsigned w[4] = {u.x, u.y, u.z, u.w};
        Words16<bf16>::words(w, 8, o);
    }
};
template <> struct ChunkLoad<__half, 4> {
    static __device__ __forceinline__ void load(const __half* p, int, float o[4]) {
        const uint2 u = *reinterpret_cast<const uint2*>(p);
        const unsigned w[2] = {u.x, u.y};
        Words16<__half>::words(w, 4, o);
    }
};
template <> struct ChunkLoad<bf16, 4> {
    static __device__ __forceinline__ void load(const bf16* p, int, float o[4]) {
        const uint2 u = *reinterpret_cast<const uint2*>(p);
        const unsigned w[2] = {u.x, u.y};
        Words16<bf16>::words(w, 4, o);
    }
};
template <> struct ChunkLoad<unsigned char, 8> {
    static __device__ __forceinline__ void load(const unsigned char* p, int format, float o[8]) {
        const uint2 u = *reinterpret_cast<const uint2*>(p);
        for (int i = 0; i < 4; ++i) o[i] = fp8_e4m3_to_float((u.x >> (8 * i)) & 0xFFu, format);
        for (int i = 0; i < 4; ++i) o[4 + i] = fp8_e4m3_to_float((u.y >> (8 * i)) & 0xFFu, format);
    }
};
template <> struct ChunkLoad<unsigned char, 4> {
    static __device__ __forceinline__ void load(const unsigned char* p, int format, float o[4]) {
        const unsigned u = *reinterpret_cast<const unsigned*>(p);
        for (int i = 0; i < 4; ++i) o[i] = fp8_e4m3_to_float((u >> (8 * i)) & 0xFFu, format);
    }
};

template <typename C>
__device__ __forceinline__ void load8_float(const C* p, int valid, bool vec, int format, float out[8]) {
    if (vec && valid >= 8) {
        ChunkLoad<C, 8>::load(p, format, out);
    } else {
        for (int i = 0; i < 8; ++i) out[i] = i < valid ? cache_to_float(p[i], format) : 0.0f;
    }
}

template <typename C>
__device__ __forceinline__ void load4_float(const C* p, int valid, bool vec, int format, float out[4]) {
    if (vec && valid >= 4) {
        ChunkLoad<C, 4>::load(p, format, out);
    } else {
        for (int i = 0; i < 4; ++i) out[i] = i < valid ? cache_to_float(p[i], format) : 0.0f;
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

// Eight 16-bit elements of a K-row from k on, as raw bits (zeros past K or for a missing row): one
// 16-byte load when `vec` (every row 16-byte aligned: aligned base, K % 8 == 0), else load8_bits.
__device__ __forceinline__ uint4 load_row_chunk(const unsigned short* row, int k, int K, bool vec) {
    if (!row || k >= K) return make_uint4(0u, 0u, 0u, 0u);
    return vec ? *reinterpret_cast<const uint4*>(row + k) : load8_bits(row + k, min(8, K - k));
}

// Whether N-element chunks of rows `row_elems` long, starting at `base`, are all aligned for the
// vector path (8 elements: 16 bytes for float / 16-bit types, 8 bytes for fp8; 4 elements: half that,
// 16 bytes for float).
template <typename C, int N = 8>
__device__ __forceinline__ bool chunks_aligned(const C* base, int row_elems) {
    const unsigned bytes = sizeof(C) == 4 ? 16u : N * (unsigned)sizeof(C);
    return (unsigned long long)row_elems * sizeof(C) % bytes == 0 && reinterpret_cast<unsigned long long>(base) % bytes == 0;
}

// ---------------------------------------------------------------- register-prefetch main loop
// The K loop of every tiled GEMM (gemm, grouped GEMM, quantized GEMMs, SIMT and matrix units): the
// next slice is loaded into registers while the current one is multiplied out of shared memory.
//   load(slice):  issue the global loads of `slice` into registers (in flight during compute)
//   store():      write the registers to the shared tiles (then a barrier)
//   compute(s):   the multiply-adds of slice s over the shared tiles (then a barrier, before the
//                 next store)
template <class Load, class Store, class Compute>
__device__ __forceinline__ void prefetch_main_loop(int slices, Load&& load, Store&& store, Compute&& compute) {
    for (int slice = 0; slice <= slices; ++slice) {
        if (slice > 0) {
            store();
            __syncthreads();
        }
        if (slice < slices) load(slice);
        if (slice > 0) {
            compute(slice - 1);
            __syncthreads();  // everyone is done reading before the next slice overwrites
        }
    }
}

// ================================================================ expert row tiles (grouped GEMMs)
// Which rows of x / a a block owns, in one of three layouts (R rows in all; `expert_rows` and
// `rows_per_expert` are kernel arguments of every grouped GEMM):
//
// - Plain GEMMs (expert_rows == nullptr): tile blockIdx.x of `BM` rows, expert 0.
// - Contiguous (rows_per_expert == 0; moe_align's layout): expert_rows holds E + 1 offsets, expert
//   e owns rows [offsets[e], offsets[e + 1]); its segment is cut into BM-row tiles in expert order,
//   then come the tiles of the rows no expert owns (before offsets[0], from offsets[E]), which the
//   block writes as zeros (expert -1). Offsets are clamped into [0, R] so that bad device data cannot
//   send a tile out of bounds. Grid bound: with L rows covered the expert tiles number at most
//   (L + (BM - 1) E) / BM and the zero tiles at most (R - L + 2 (BM - 1)) / BM, together
//   < R / BM + E + 2, so grid.x = ceil(R / BM) + E + 1 covers both; the blocks past them get
//   rows <= 0 and exit.
// - Masked (rows_per_expert M > 0; DeepEP's low-latency layout, R = E M): expert_rows holds E
//   counts, expert e owns rows [e M, e M + clamp(counts[e], 0, M)) and the rest of its M rows are
//   zeros. No scan: with T = ceil(M / BM), grid.x = 2 E T; tile i < E T computes those of rows
//   (i % T) BM .. + BM of expert i / T that are below the count, tile E T + i zeros the others of
//   the same BM rows (either may have no rows: it exits).
struct RowTile {
    int row0, rows, expert;  // rows <= 0: no work; expert -1: rows [row0, row0 + rows) are zeros
};

// Contiguous layout: warp 0 scans the experts warpSize at a time (shuffle prefix sum of their tile
// counts, no shared scratch and no barrier per chunk) and the lane whose expert holds this block's
// tile publishes it in *shared_tile; masked layout: thread 0 works it out and publishes it. Every
// thread must call it (one barrier); the tile comes back from shared memory in every grouped
// layout (a tile in registers from one layout and in shared memory from the other costs
// grouped_gemm_simt 16 registers, a quarter of its occupancy, on sm_80 / sm_89).
template <int BM>
__device__ __forceinline__ RowTile expert_row_tile(const int* __restrict__ expert_rows, int experts, int R, int rows_per_expert, RowTile* shared_tile) {
    const int tile = blockIdx.x;
    if (!expert_rows) return RowTile{tile * BM, min(BM, R - tile * BM), 0};
    if (rows_per_expert > 0) {
        if (threadIdx.x == 0) {
            const int per_expert = (rows_per_expert + BM - 1) / BM, compute_tiles = experts * per_expert;
            const bool zeros = tile >= compute_tiles;
            const int t = zeros ? tile - compute_tiles : tile, e = t / per_expert, first = t % per_expert * BM;
            const int count = e < experts ? min(max(expert_rows[e], 0), rows_per_expert) : 0;
            const int lo = zeros ? max(count, first) : first, hi = min(zeros ? rows_per_expert : count, first + BM);
            *shared_tile = e < experts ? RowTile{e * rows_per_expert + lo, hi - lo, zeros ? -1 : e} : RowTile{0, 0, -1};
        }
    } else if ((int)threadIdx.x < warpSize) {
        const int* offsets = expert_rows;
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
            const int inclusive = warp_inclusive_scan(tiles);
            const int first = before + inclusive - tiles;
            if (tile >= first && tile < first + tiles) {
                const int row0 = start + (tile - first) * BM;
                *shared_tile = RowTile{row0, min(BM, end - row0), e};
            }
            before += warp_shfl(inclusive, warpSize - 1);
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
// c0 + p. Gated: p is the gate row (p even) or the up row (p odd, n_out further on) of column
// c0 + p / 2, so the pairs (p, p + 1) a thread accumulates combine in registers.
// The expert-local weight row of position p, or -1 past the last output column:
__device__ __forceinline__ int weight_row(int p, int c0, int n_out, int gated) {
    const int col = c0 + (gated ? p >> 1 : p);
    return col >= n_out ? -1 : (gated && (p & 1) ? n_out + col : col);
}

// Output columns of a block of `positions` weight rows: half of them when gated.
__device__ __forceinline__ int block_columns(int positions, int gated) { return gated ? positions / 2 : positions; }

// The fp32 accumulators of positions p, p + 1 (p even) of one output row through the epilogue:
// act(v0), act(v1) in two columns, or (gated) act(gate) * up in one; rounded once to T.
template <typename T>
__device__ __forceinline__ void store_pair(T* __restrict__ out_row, int n_out, int c0, int p, float v0, float v1, int activation, int gated) {
    if (gated) {
        if (c0 + p / 2 < n_out) out_row[c0 + p / 2] = from_float<T>(activate(v0, activation) * v1);
    } else {
        if (c0 + p < n_out) out_row[c0 + p] = from_float<T>(activate(v0, activation));
        if (c0 + p + 1 < n_out) out_row[c0 + p + 1] = from_float<T>(activate(v1, activation));
    }
}
