// Written once for both vendors in CUDA's dialect; compiled as HIP for AMD through the vendor
// shim hal_vendor.h (docs/gpu-kernels.md).
// quantize / dequantize: float tensors to and from fp8, int8, int4, mxfp4 and nvfp4 with their scales.
// ops/quant.py gives the semantics, hal/formats.py the formats and the cast (round to nearest even,
// satfinite); the element conversions are the software ones of hal_gpu.h, bit-exact everywhere.
//
// x is [batch, M, K] (leading dimensions flattened), row-major. A scale group is a rectangle of
// group_rows x group_cols elements: tensor (M x K), row (1 x K), group (1 x g), block (g x g),
// channel (M x 1); the scales are [batch, ceil(M / group_rows), ceil(K / group_cols)].
//
//   quantize_groups  row / group / block / mxfp4 / nvfp4, fused: a team of lanes reduces one
//                    group, computes its scale and encodes it (x is read twice, the second time
//                    from L1 / L2).
//   quantize_stats   tensor / channel, first pass: per-group maxima with atomicMax into a scratch
//                    (also nvfp4's per-tensor amax, before quantize_groups).
//   quantize_apply   tensor / channel, second pass: stores the scales and encodes element-wise.
//   dequantize       element-wise, 8 consecutive elements of a row per thread.
#include "hal_gpu.h"

// Formats are the HAL_FMT_* codes of hal/codes.py (int4: signed nibbles -8..7, symmetric; uint4:
// int4 with zero points, nibbles 0..15; mxfp4 / nvfp4: E2M1 with E8M0 / e4m3fn block scales).

#define HAL_NVFP4_TENSOR_MAX 2688.0f  // e4m3fn max x E2M1 max
#define HAL_QUANT_BLOCK 256

__device__ __forceinline__ bool is_packed(int fmt) { return fmt >= HAL_FMT_INT4; }  // two 4-bit codes per byte

// ---------------------------------------------------------------- group statistics
// A group is summarized by the largest positive part max(x, 0) and negative part max(-x, 0), as
// fp32 bit patterns: amax is the larger of the two, int4 zero points use both. Non-negative floats
// order like their bits read as integers, so every max below is an integer max (and atomicMax(int)
// across blocks); a NaN's bits exceed inf's, so a NaN wins every max, as in the reference.
struct GroupMax {
    unsigned pos, neg;
};

__device__ __forceinline__ void accumulate(GroupMax& m, float x) {
    const unsigned bits = __builtin_bit_cast(unsigned, x), mag = bits & 0x7FFFFFFFu;
    const bool nan = mag > 0x7F800000u, negative = (bits >> 31) != 0u;
    if (nan || !negative) m.pos = max(m.pos, mag);
    if (nan || negative) m.neg = max(m.neg, mag);
}

__device__ __forceinline__ void atomic_max_bits(unsigned* p, unsigned bits) { atomicMax(reinterpret_cast<int*>(p), (int)bits); }

// Max over a team of `team` consecutive threads (a power of two, the same for the whole block):
// xor shuffles below `team` stay inside the team's aligned lanes; a team wider than a warp then
// combines its warps through `scratch` (HAL_MAX_WARPS entries). Every thread of the block calls it.
__device__ __forceinline__ unsigned team_max(unsigned v, int team, unsigned* scratch) {
    for (int offset = min(team, warpSize) / 2; offset > 0; offset >>= 1) v = max(v, warp_shfl_xor(v, offset));
    if (team > warpSize) {
        const int warps = team / warpSize, warp = threadIdx.x / warpSize, first = warp / warps * warps;
        __syncthreads();  // the previous call's readers are done with scratch
        if (threadIdx.x % warpSize == 0) scratch[warp] = v;
        __syncthreads();
        for (int w = first; w < first + warps; ++w) v = max(v, scratch[w]);
    }
    return v;
}

__device__ __forceinline__ GroupMax team_max(GroupMax m, int team, unsigned* scratch) {
    return {team_max(m.pos, team, scratch), team_max(m.neg, team, scratch)};
}

// ---------------------------------------------------------------- scales and codes

struct GroupScale {
    float divisor;  // code = encode(x / divisor)
    float zero;     // uint4: added to the rounded quotient
    float stored;   // the float32 scale written for fp8 / int8 / int4
    unsigned code;  // the scale code written for mxfp4 (E8M0) and nvfp4 (e4m3fn)
};

__device__ __forceinline__ float symmetric_max(int fmt) {
    switch (fmt) {
        case HAL_FMT_FP8_E4M3FN: return 448.0f;
        case HAL_FMT_FP8_E4M3FNUZ: return 240.0f;
        case HAL_FMT_FP8_E5M2: return 57344.0f;
        case HAL_FMT_INT8: return 127.0f;
        default: return 7.0f;  // int4
    }
}

// amax / fmax in fp32, 1 where amax is 0 (NaN and inf propagate).
__device__ __forceinline__ float amax_scale(unsigned amax_bits, float fmax) {
    return amax_bits == 0u ? 1.0f : __builtin_bit_cast(float, amax_bits) / fmax;
}

// v rounded to the nearest integer, ties to even, for |v| < 2^23 (callers clamp first).
__device__ __forceinline__ int round_half_even(float v) {
    const unsigned bits = __builtin_bit_cast(unsigned, v), field = (bits >> 23) & 0xFFu;
    if (field < 126u) return 0;  // |v| < 0.5
    const int mag = (int)shift_right_rne((bits & 0x7FFFFFu) | 0x800000u, 150u - field);
    return (bits >> 31) ? -mag : mag;
}

// rint(v) clamped to [lo, hi], NaN -> 0 (the reference's nan_to_num, rint, clip).
__device__ __forceinline__ int round_clamped(float v, float lo, float hi) {
    return v != v ? 0 : round_half_even(fminf(fmaxf(v, lo), hi));
}

// Exact results of one fp32 operation rounded to fp32 "to odd" instead of to nearest: `rounded` is
// the correctly rounded result and `residual` the exact result minus it (from an fma, exact). When
// inexact, the odd one of the two fp32 neighbours of the exact value is taken. Rounding that again
// to a format with at least two fewer significant bits (fp8, fp4, the integers, fp16, bf16) gives
// the exact value rounded once, as the float64 reference does; a plain fp32 quotient or product
// would be off by one code where it lands on a tie of the narrower format.
__device__ __forceinline__ float round_to_odd(float rounded, float residual) {
    const unsigned bits = __builtin_bit_cast(unsigned, rounded);
    const bool exact = residual == 0.0f || residual != residual, even = (bits & 1u) == 0u;
    if (exact || !even || (bits & 0x7FFFFFFFu) == 0u || (bits & 0x7F800000u) == 0x7F800000u) return rounded;
    const bool larger = (residual > 0.0f) == ((bits >> 31) == 0u);  // the exact value has the larger magnitude
    return __builtin_bit_cast(float, larger ? bits + 1u : bits - 1u);
}

// x / d rounded to odd. Divisors are positive scales (or 0, inf, NaN, whose quotients are left
// alone), so x - q * d has the sign of x / d - q.
__device__ __forceinline__ float divide_to_odd(float x, float d) {
    const float q = x / d;
    return round_to_odd(q, fmaf(-q, d, x));
}

// a * b rounded to odd.
__device__ __forceinline__ float multiply_to_odd(float a, float b) {
    const float p = a * b;
    return round_to_odd(p, fmaf(a, b, -p));
}

// The scale of a group from its maxima, with the fp32 steps of the reference. `tensor_scale` is
// nvfp4's (1 for the other formats).
__device__ __forceinline__ GroupScale group_scale(GroupMax m, int fmt, float tensor_scale) {
    const unsigned amax = max(m.pos, m.neg);
    GroupScale s = {1.0f, 0.0f, 1.0f, 0u};
    if (fmt == HAL_FMT_UINT4) {
        const float hi = __builtin_bit_cast(float, m.pos), lo = -__builtin_bit_cast(float, m.neg);
        s.divisor = s.stored = hi == lo ? 1.0f : (hi - lo) / 15.0f;
        s.zero = (float)round_clamped(-lo / s.divisor, 0.0f, 15.0f);
    } else if (fmt == HAL_FMT_MXFP4) {
        // e = floor(log2 amax) - 2 (E2M1's emax) clamped to [-127, 127], stored as e + 127: amax's
        // fp32 exponent field is floor(log2) + 127 for a normal amax, and a field below 2 (amax
        // below 2^-125, zero and subnormals included) clamps to -127. Non-finite amax: 0xFF, NaN.
        const unsigned field = amax >> 23;
        s.code = amax >= 0x7F800000u ? 0xFFu : (field > 2u ? field : 2u) - 2u;
        s.divisor = e8m0_to_float(s.code);  // a NaN divisor makes every code +0
    } else if (fmt == HAL_FMT_NVFP4) {
        s.code = float_to_fp8(__builtin_bit_cast(float, amax) / 6.0f / tensor_scale, HAL_FMT_FP8_E4M3FN);
        s.divisor = fp8_to_float(s.code, HAL_FMT_FP8_E4M3FN) * tensor_scale;
    } else {
        s.divisor = s.stored = amax_scale(amax, symmetric_max(fmt));
    }
    return s;
}

// The code of x (a byte, or a 4-bit code in the low bits) in a group of the given divisor / zero.
__device__ __forceinline__ unsigned quantize_value(float x, float divisor, float zero, int fmt) {
    const float v = divide_to_odd(x, divisor);
    switch (fmt) {
        case HAL_FMT_INT8: return (unsigned)round_clamped(v, -128.0f, 127.0f) & 0xFFu;
        case HAL_FMT_INT4: return (unsigned)round_clamped(v, -8.0f, 7.0f) & 0xFu;
        case HAL_FMT_UINT4: return (unsigned)min(max(round_clamped(v, -16.0f, 16.0f) + (int)zero, 0), 15);
        case HAL_FMT_MXFP4: return float_to_e2m1(v);
        case HAL_FMT_NVFP4: return divisor == 0.0f ? 0u : float_to_e2m1(v);  // a zero block scale: code 0
        default: return float_to_fp8(v, fmt);
    }
}

// ---------------------------------------------------------------- fused: quantize_groups
// Positions first, first + step, ... of a row-major rectangle `cols` wide (cols > 0), advanced
// without a division per step.
struct RectWalk {
    int r, c, dr, dc, cols;
    __device__ __forceinline__ RectWalk(int first, int step, int cols_) : r(first / cols_), c(first % cols_), dr(step / cols_), dc(step % cols_), cols(cols_) {}
    __device__ __forceinline__ void next() {
        r += dr;
        c += dc;
        if (c >= cols) c -= cols, ++r;
    }
};

// Each block holds blockDim.x / team groups, one per team of `team` lanes: consecutive groups of
// one band of group_rows rows, or, when a band is a single group (row granularity, or block with
// K <= g), consecutive bands. The team reduces its group, its first lane stores the scale, and the
// team encodes the group: every thread writes whole bytes, those whose first element is in its
// group. With packed codes and an odd group width a byte can end in the next group, whose
// divisor / zero the team reads from shared memory (the glue keeps such a group's neighbour in
// the same block). nvfp4 reads the tensor scale that quantize_apply stored.
template <typename T>
__global__ void __launch_bounds__(HAL_QUANT_BLOCK) quantize_groups(const T* __restrict__ x, const float* __restrict__ tensor_scale, unsigned char* __restrict__ q,
                                                                   float* __restrict__ scales, unsigned char* __restrict__ scale_codes,
                                                                   unsigned char* __restrict__ zeros, int batch, int M, int K, int group_rows,
                                                                   int group_cols, int team, int fmt) {
    __shared__ unsigned scratch[HAL_MAX_WARPS];
    __shared__ float shared_divisor[HAL_QUANT_BLOCK], shared_zero[HAL_QUANT_BLOCK];
    const int bands_per_entry = (M + group_rows - 1) / group_rows, groups_per_band = (K + group_cols - 1) / group_cols;
    const int slots = blockDim.x / team, slot = threadIdx.x / team, lane = threadIdx.x % team;
    long long band;
    int gcol;
    if (groups_per_band == 1) {
        band = (long long)blockIdx.x * slots + slot, gcol = 0;
    } else {
        const int spans = (groups_per_band + slots - 1) / slots;
        band = blockIdx.x / spans, gcol = (int)(blockIdx.x % spans) * slots + slot;
    }
    const bool valid = band < (long long)batch * bands_per_entry && gcol < groups_per_band;
    const int entry = valid ? (int)(band / bands_per_entry) : 0, r0 = valid ? (int)(band % bands_per_entry) * group_rows : 0;
    const int c0 = gcol * group_cols, rows = valid ? min(group_rows, M - r0) : 0, cols = valid ? min(group_cols, K - c0) : 1;
    const long long row0 = (long long)entry * M + r0;  // first row of the group in x viewed as [batch * M, K]

    GroupMax m = {0u, 0u};
    for (RectWalk w(lane, team, cols); w.r < rows; w.next()) accumulate(m, to_float(x[(row0 + w.r) * K + c0 + w.c]));
    m = team_max(m, team, scratch);
    const GroupScale s = group_scale(m, fmt, valid && fmt == HAL_FMT_NVFP4 ? tensor_scale[entry] : 1.0f);
    if (valid && lane == 0) {
        const long long at = band * groups_per_band + gcol;
        if (fmt == HAL_FMT_MXFP4 || fmt == HAL_FMT_NVFP4) scale_codes[at] = (unsigned char)s.code;
        else scales[at] = s.stored;
        if (zeros) zeros[at] = (unsigned char)s.zero;
        shared_divisor[slot] = s.divisor, shared_zero[slot] = s.zero;
    }
    __syncthreads();

    if (!is_packed(fmt)) {
        for (RectWalk w(lane, team, cols); w.r < rows; w.next()) {
            const long long at = (row0 + w.r) * K + c0 + w.c;
            q[at] = (unsigned char)quantize_value(to_float(x[at]), s.divisor, s.zero, fmt);
        }
        return;
    }
    const int first_byte = (c0 + 1) / 2, bytes = (c0 + cols + 1) / 2 - first_byte, end = c0 + cols;
    for (RectWalk w(lane, team, max(bytes, 1)); bytes > 0 && w.r < rows; w.next()) {
        const int byte = first_byte + w.c, c = 2 * byte;
        const T* xr = x + (row0 + w.r) * K;
        const unsigned low = quantize_value(to_float(xr[c]), s.divisor, s.zero, fmt);
        const unsigned high = c + 1 < end ? quantize_value(to_float(xr[c + 1]), s.divisor, s.zero, fmt)
                                          : quantize_value(to_float(xr[c + 1]), shared_divisor[slot + 1], shared_zero[slot + 1], fmt);
        q[(row0 + w.r) * (K / 2) + byte] = (unsigned char)(low | (high << 4));
    }
}

// ---------------------------------------------------------------- two passes: tensor and channel
// quantize_stats: `maxima` ([batch][K][2] per channel, [batch][2] per tensor, zero-filled by the
// glue) gets the group maxima. Per channel a block covers blockDim.x columns (a thread per column,
// coalesced across the warp) of `rows_per_block` rows; per tensor, rows_per_block * blockDim.x
// consecutive elements of one batch entry, reduced over the block. One atomicMax per value.
template <typename T>
__global__ void __launch_bounds__(HAL_QUANT_BLOCK) quantize_stats(const T* __restrict__ x, unsigned* __restrict__ maxima, int batch, int M, int K,
                                                                  int per_column, int rows_per_block) {
    __shared__ unsigned scratch[HAL_MAX_WARPS];
    GroupMax m = {0u, 0u};
    if (per_column) {
        const int column_blocks = (K + blockDim.x - 1) / blockDim.x, row_blocks = (M + rows_per_block - 1) / rows_per_block;
        const int entry = blockIdx.x / (column_blocks * row_blocks), rest = blockIdx.x % (column_blocks * row_blocks);
        const int c = rest % column_blocks * blockDim.x + threadIdx.x, r0 = rest / column_blocks * rows_per_block;
        if (entry >= batch || c >= K) return;
        const T* xc = x + (long long)entry * M * K + c;
        for (int r = r0; r < min(M, r0 + rows_per_block); ++r) accumulate(m, to_float(xc[(long long)r * K]));
        unsigned* out = maxima + ((long long)entry * K + c) * 2;
        if (m.pos) atomic_max_bits(out, m.pos);
        if (m.neg) atomic_max_bits(out + 1, m.neg);
        return;
    }
    const long long n = (long long)M * K, span = (long long)rows_per_block * blockDim.x;
    const long long blocks_per_entry = (n + span - 1) / span;
    const int entry = (int)(blockIdx.x / blocks_per_entry);
    const long long begin = blockIdx.x % blocks_per_entry * span, end = min(n, begin + span);
    if (entry < batch)
        for (long long i = begin + threadIdx.x; i < end; i += blockDim.x) accumulate(m, to_float(x[entry * n + i]));
    m = team_max(m, blockDim.x, scratch);
    if (threadIdx.x == 0 && entry < batch) {
        if (m.pos) atomic_max_bits(maxima + 2 * entry, m.pos);
        if (m.neg) atomic_max_bits(maxima + 2 * entry + 1, m.neg);
    }
}

// quantize_apply: thread i stores the scale (and zero) of group i, and encodes unit i (an element,
// or a byte of two packed elements) from its group's maxima. With q == nullptr it only stores the
// scales: for nvfp4 (per tensor, fmax 448 * 6) that is the tensor scale quantize_groups reads.
template <typename T>
__global__ void __launch_bounds__(HAL_QUANT_BLOCK) quantize_apply(const T* __restrict__ x, const unsigned* __restrict__ maxima, unsigned char* __restrict__ q,
                                                                  float* __restrict__ scales, unsigned char* __restrict__ zeros, int batch, int M, int K,
                                                                  int per_column, int fmt) {
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    const long long groups = (long long)batch * (per_column ? K : 1);
    if (i < groups) {
        const GroupMax m = {maxima[2 * i], maxima[2 * i + 1]};
        if (fmt == HAL_FMT_NVFP4) {
            scales[i] = amax_scale(max(m.pos, m.neg), HAL_NVFP4_TENSOR_MAX);
        } else {
            const GroupScale s = group_scale(m, fmt, 1.0f);
            scales[i] = s.stored;
            if (zeros) zeros[i] = (unsigned char)s.zero;
        }
    }
    const int per_unit = is_packed(fmt) ? 2 : 1, units_per_row = K / per_unit;
    if (q == nullptr || i >= (long long)batch * M * units_per_row) return;
    const long long row = i / units_per_row;
    const int unit = (int)(i % units_per_row), entry = (int)(row / M);
    unsigned code = 0;
    for (int e = 0; e < per_unit; ++e) {
        const int c = unit * per_unit + e;
        const long long g = per_column ? (long long)entry * K + c : entry;
        const GroupScale s = group_scale({maxima[2 * g], maxima[2 * g + 1]}, fmt, 1.0f);
        code |= quantize_value(to_float(x[row * K + c]), s.divisor, s.zero, fmt) << (4 * e);
    }
    q[i] = (unsigned char)code;
}

// ---------------------------------------------------------------- dequantize
// Thread i handles 8 consecutive elements of one row: one 8-byte (or, packed, 4-byte) load of codes
// and one 16-byte (32 for float) store when K % 8 == 0 and the pointers are aligned, element by
// element otherwise. The scale group advances along the chunk without a division per element.
// out = decode(q) * scale rounded once to T; nvfp4 multiplies code by block scale first (exact:
// 2 x 4 significant bits), then by the tensor scale.

// The bits of one element, in the low bits of a 32-bit word.
__device__ __forceinline__ unsigned element_bits(float v) { return __builtin_bit_cast(unsigned, v); }
__device__ __forceinline__ unsigned element_bits(__half v) { return __builtin_bit_cast(unsigned short, v); }
__device__ __forceinline__ unsigned element_bits(bf16 v) { return __builtin_bit_cast(unsigned short, v); }

template <typename T>
__device__ __forceinline__ void store8(T* p, const float v[8], int valid, bool vec) {
    if (vec && valid == 8) {
        constexpr int per_word = 4 / sizeof(T);
        unsigned words[8 / per_word] = {};  // the chunk as 32-bit words, stored 4 at a time
        for (int e = 0; e < 8; ++e) words[e / per_word] |= element_bits(from_float<T>(v[e])) << (32 / per_word * (e % per_word));
        for (int w = 0; w < 8 / per_word; w += 4) reinterpret_cast<uint4*>(p)[w / 4] = make_uint4(words[w], words[w + 1], words[w + 2], words[w + 3]);
    } else {
        for (int e = 0; e < 8; ++e)
            if (e < valid) p[e] = from_float<T>(v[e]);
    }
}

// One element of group g: the exact factors decode(code) and scale, multiplied. fp32 out: the
// correctly rounded product; 16-bit out: rounded to odd, so that store8's rounding to T is the
// only one.
template <typename T>
__device__ __forceinline__ float dequantize_value(unsigned code, long long g, const float* __restrict__ scales, const unsigned char* __restrict__ scale_codes,
                                                  const unsigned char* __restrict__ zeros, float tensor_scale, int fmt) {
    float value, scale;
    switch (fmt) {
        case HAL_FMT_INT8: value = (float)((int)(code ^ 0x80u) - 128), scale = scales[g]; break;
        case HAL_FMT_INT4: value = (float)int4_to_int(code), scale = scales[g]; break;
        case HAL_FMT_UINT4: value = (float)((int)code - (int)zeros[g]), scale = scales[g]; break;
        case HAL_FMT_MXFP4: value = e2m1_to_float(code), scale = e8m0_to_float(scale_codes[g]); break;
        case HAL_FMT_NVFP4: value = e2m1_to_float(code) * fp8_to_float(scale_codes[g], HAL_FMT_FP8_E4M3FN), scale = tensor_scale; break;
        default: value = fp8_to_float(code, fmt), scale = scales[g];
    }
    return sizeof(T) == 4 ? value * scale : multiply_to_odd(value, scale);
}

template <typename T>
__global__ void __launch_bounds__(HAL_QUANT_BLOCK) dequantize(const unsigned char* __restrict__ q, const float* __restrict__ scales,
                                                              const unsigned char* __restrict__ scale_codes, const unsigned char* __restrict__ zeros,
                                                              const float* __restrict__ tensor_scale, T* __restrict__ out, int batch, int M, int K,
                                                              int group_rows, int group_cols, int fmt) {
    const int chunks_per_row = (K + 7) / 8;
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)batch * M * chunks_per_row) return;
    const long long row = i / chunks_per_row;
    const int c0 = (int)(i % chunks_per_row) * 8, valid = min(8, K - c0), entry = (int)(row / M), r = (int)(row % M);
    const bool packed = is_packed(fmt);
    const long long code_at = packed ? (row * K + c0) / 2 : row * K + c0;

    unsigned codes[8];
    const bool vec = K % 8 == 0 && reinterpret_cast<unsigned long long>(q) % 8 == 0 && reinterpret_cast<unsigned long long>(out) % 16 == 0;
    if (vec && packed) {
        const unsigned word = *reinterpret_cast<const unsigned*>(q + code_at);
        for (int e = 0; e < 8; ++e) codes[e] = (word >> (4 * e)) & 0xFu;
    } else if (vec) {
        const uint2 word = *reinterpret_cast<const uint2*>(q + code_at);
        for (int e = 0; e < 4; ++e) codes[e] = (word.x >> (8 * e)) & 0xFFu, codes[4 + e] = (word.y >> (8 * e)) & 0xFFu;
    } else {
        for (int e = 0; e < 8; ++e) codes[e] = e >= valid ? 0u : packed ? (q[code_at + e / 2] >> (4 * (e & 1))) & 0xFu : q[code_at + e];
    }

    const int bands_per_entry = (M + group_rows - 1) / group_rows, groups_per_band = (K + group_cols - 1) / group_cols;
    const long long band_at = ((long long)entry * bands_per_entry + r / group_rows) * groups_per_band;
    int gcol = c0 / group_cols, next = (gcol + 1) * group_cols;
    const float tensor = fmt == HAL_FMT_NVFP4 ? tensor_scale[entry] : 1.0f;
    float v[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
    for (int e = 0; e < 8; ++e) {  // unrolled: constant indices keep codes[] and v[] in registers
        if (e < valid) {
            if (c0 + e >= next) ++gcol, next += group_cols;
            v[e] = dequantize_value<T>(codes[e], band_at + gcol, scales, scale_codes, zeros, tensor, fmt);
        }
    }
    store8(out + row * K + c0, v, valid, vec);
}
