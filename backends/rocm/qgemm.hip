// Vendor file: which MFMA forms exist (32x32x8 f16 / bf16, 32x32x16 fp8 FNUZ on gfx94x, i8 on
// gfx90a / gfx94x) decides how operands are staged and decoded (docs/hardware.md).
// Quantized GEMMs, out = a @ b.T with weights b [N, K] (K-contiguous, like a), written for AMD:
//
//   fp8_gemm_simt<To>      fp8 block-scaled, plain and grouped (MoE, fused activation, optionally gated); any target
//   fp8_gemm_mfma<To>      same, fp8 decoded exactly to f16, v_mfma_f32_32x32x8f16   (gfx90a, gfx94x)
//   fp8_gemm_mfma_fp8<To>  same, fp8 codes straight into v_mfma_f32_32x32x16_fp8_fp8 (gfx94x, e4m3fnuz)
//   int8_gemm_simt<To>     W8A8, exact int32 sums; any target
//   int8_gemm_mfma<To>     same, v_mfma_i32_32x32x16_i8 (gfx94x) / 2 x v_mfma_i32_32x32x8i8 (gfx90a)
//   w4a16_gemm_simt<T>     int4 weights with group scales (and zero points); any T, any target
//   w4a16_gemm_mfma<T>     same, T = f16 / bf16 through v_mfma_f32_32x32x8{f16,bf16_1k}
//   fp4_gemm_simt<T>, fp4_gemm_mfma<T>   E2M1 weights with mxfp4 (E8M0 / 32) or nvfp4 (E4M3 / 16) scales
//
// Block and tile, every kernel: 256 threads, 64 rows of a x 64 weight rows ("positions"), except
// the weight-only MFMA kernels: 64 x 32 (see MfmaEngine). On CDNA a block is 4 waves of 64, each
// owning one 32 x 32 MFMA tile; the SIMT kernels see 16 x 16 threads with 4 x 4 outputs each (also
// right for wave32 RDNA: nothing below the block level assumes a wave size).
// Grid (chosen by backends/gpu/launch_qgemm.py): x = row tiles, y = position tiles. Plain GEMMs:
// x = ceil(M / 64), position p of tile y is output column 64 y + p (32 y + p). Grouped fp8
// (expert_rows != nullptr): x is ceil(M / 64) + E + 1 over offsets, 2 E ceil(rows_per_expert / 64)
// in the masked layout; see expert_row_tile in hal_gpu.h.
// Gated: positions pair up, p even = gate row, p odd = up row of output column 32 y + p / 2,
// so such a block covers 32 output columns.
//
// Scales. Inside a scale group only exact values are multiplied: fp8 codes (every e4m3 value is an
// f16), int4 q - zero (|.| <= 15) and E2M1 values are exact in f16 and bf16. After the last k of a
// group the fp32 partial tile is multiplied by the group's scales and added to the accumulator:
// for fp8 that is the required promotion every 128 K; for int4 / fp4 it keeps the weights exact
// (mxfp4's 2^-127..2^127 scales do not fit f16) at one FMA per accumulator per group. Groups are
// multiples of 16, so a group always ends with a 16-deep k step (or at K).
//
// LDS (static; 64 KiB per CU on CDNA and RDNA, so 3+ blocks per CU): fp8 decoded to f16 18 KiB,
// native fp8 and int8 9 KiB, weight-only f16 / bf16 13.5 KiB, SIMT 17 KiB, all under the 48 KiB
// the glue budgets. Registers: an MFMA lane holds 16 fp32 accumulators + 16 partials and keeps
// the next k slice in flight as raw bytes (2-8 VGPRs); no kernel spills on gfx90a / gfx940 / gfx1030
// (numbers in docs/gpu-kernels.md).
#include "hal_gpu.h"

#define QG_BM 64       // rows of a per block
#define QG_BN 64       // weight rows (positions) per block
#define QG_THREADS 256
#define QG_CHUNK 8     // consecutive k a thread loads and stores at once

// ====================================================================== what a block computes
// Rows: expert_row_tile<QG_BM> (hal_gpu.h; plain GEMMs pass no expert rows). Positions: weight_row.
struct Tile {
    int row0, rows;  // rows of a and out; rows <= 0: nothing
    int expert;      // which b / b_scales; -1: a zero tile (grouped rows outside every expert)
    int col0;        // first output column
    int n_out, gated;
    int activation;  // epilogue: act(v), or act(gate) * up when gated (HAL_ACT_* of hal/codes.py)

    __device__ __forceinline__ int weight_row(int p) const { return ::weight_row(p, col0, n_out, gated); }
    __device__ __forceinline__ int columns() const { return gated ? QG_BN / 2 : QG_BN; }
};

// bn: positions per block (64, or 32 for the weight-only MFMA kernels).
__device__ __forceinline__ Tile block_tile(const RowTile& r, int n_out, int gated, int bn = QG_BN, int activation = HAL_ACT_NONE) {
    return Tile{r.row0, r.rows, r.expert, (int)blockIdx.y * block_columns(bn, gated), n_out, gated, activation};
}

__device__ __forceinline__ Tile plain_tile(int rows, int n_out, int bn = QG_BN) {
    return block_tile(expert_row_tile<QG_BM>(nullptr, 1, rows, 0, nullptr), n_out, 0, bn);
}

// ====================================================================== operands: 8 consecutive k of one row
// A source fetches k .. k+7 of a row (k a multiple of 8, row valid, k < K) as a compact Chunk (what
// is in flight in registers during the math of the previous slice: 2 VGPRs for 8 fp8 codes, 1 for
// 8 nibbles) and decodes it when the chunk is stored to LDS, into the staged type S: fp32 for the
// SIMT kernels, T (f16 / bf16) for the f16 MFMA, the raw byte for the one-byte MFMAs, int for the
// int8 SIMT kernel. A value-initialized Chunk decodes to zeros (rows past the tile, k past K).

// N bytes from p, zero past `len`: one N-byte load (global_load_dwordx2 / x4) when the chunk is
// whole and aligned, which is every chunk when rows are multiples of 16 bytes; else byte by byte.
template <int N>
__device__ __forceinline__ void load_bytes(unsigned char (&dst)[N], const unsigned char* __restrict__ p, long long len) {
    static_assert((N & (N - 1)) == 0, "a power of two");
    constexpr int align = N < 16 ? N : 16;
    if (len >= N && (reinterpret_cast<unsigned long long>(p) & (align - 1)) == 0) {
        __builtin_memcpy(dst, __builtin_assume_aligned(p, align), N);
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) dst[i] = i < len ? p[i] : 0;
    }
}

template <typename A, typename B> struct SameType { static constexpr bool value = false; };
template <typename A> struct SameType<A, A> { static constexpr bool value = true; };

template <typename S> __device__ __forceinline__ S staged(float v) { return from_float<S>(v); }  // exact for every value staged here

// Activations of T (f32 / f16 / bf16).
template <typename T>
struct RowsOf {
    const T* __restrict__ base;
    int K;
    struct Chunk { unsigned char bytes[QG_CHUNK * sizeof(T)]; };
    __device__ __forceinline__ void load(int row, int k, Chunk& c) const {
        load_bytes(c.bytes, reinterpret_cast<const unsigned char*>(base + (long long)row * K + k), (long long)(K - k) * (long long)sizeof(T));
    }
    template <typename S>
    __device__ __forceinline__ void decode(const Chunk& c, S (&v)[QG_CHUNK]) const {
        T t[QG_CHUNK];
        __builtin_memcpy(t, c.bytes, sizeof(t));
#pragma unroll
        for (int e = 0; e < QG_CHUNK; ++e) {
            if constexpr (SameType<S, T>::value) v[e] = t[e];
            else v[e] = staged<S>(to_float(t[e]));
        }
    }
};

// One byte per element: fp8 codes (fp8_format 1 / 2, decoded exactly unless S is the raw byte;
// 0 is +0 in both flavours) or int8 (fp8_format 0).
struct ByteRows {
    const unsigned char* __restrict__ base;
    int K, fp8_format;
    struct Chunk { unsigned char bytes[QG_CHUNK]; };
    __device__ __forceinline__ void load(int row, int k, Chunk& c) const { load_bytes(c.bytes, base + (long long)row * K + k, K - k); }
    template <typename S>
    __device__ __forceinline__ void decode(const Chunk& c, S (&v)[QG_CHUNK]) const {
#pragma unroll
        for (int e = 0; e < QG_CHUNK; ++e) {
            if constexpr (SameType<S, unsigned char>::value) v[e] = c.bytes[e];
            else if constexpr (SameType<S, int>::value) v[e] = (signed char)c.bytes[e];
            else v[e] = staged<S>(fp8_to_float(c.bytes[e], fp8_format));
        }
    }
};

// Packed 4-bit weights [N, K / 2], first k in the low nibble: int4 (signed q, or q - zero with
// uint4 codes and zero points) or E2M1. A chunk of 8 k never straddles a zero-point group (groups
// are multiples of 16). Nibbles past K decode to 0 - zero, harmless: the activations are 0 there.
struct NibbleRows {
    const unsigned char* __restrict__ base;
    const unsigned char* __restrict__ zeros;  // [N, K / group] or nullptr (int4 only)
    int K, group, fp4;
    struct Chunk { unsigned char bytes[QG_CHUNK / 2]; int zero; };
    __device__ __forceinline__ void load(int row, int k, Chunk& c) const {
        load_bytes(c.bytes, base + (long long)row * (K / 2) + k / 2, K / 2 - k / 2);
        c.zero = zeros ? zeros[(long long)row * (K / group) + k / group] : 0;
    }
    template <typename S>
    __device__ __forceinline__ void decode(const Chunk& c, S (&v)[QG_CHUNK]) const {
#pragma unroll
        for (int e = 0; e < QG_CHUNK; ++e) {
            const unsigned nibble = (c.bytes[e / 2] >> (4 * (e % 2))) & 15u;
            const float w = fp4 ? e2m1_to_float(nibble) : zeros ? (float)((int)nibble - c.zero) : (float)int4_to_int(nibble);
            v[e] = staged<S>(w);
        }
    }
};

// ====================================================================== scales applied per group
// factor(row, weight row, group) = row(m, g) * col(n, g); `group` in k (a multiple of 16).
struct Fp8BlockScales {  // a_scales [rows, kb] per 1 x 128; b_scales [ceil(Nw / 128), kb] per 128 x 128 (this expert)
    const float* __restrict__ a;
    const float* __restrict__ b;
    int kb;
    static constexpr bool per_row = true;
    __device__ __forceinline__ int group() const { return 128; }
    __device__ __forceinline__ float row(int m, int g) const { return a[(long long)m * kb + g]; }
    __device__ __forceinline__ float col(int n, int g) const { return b[(long long)(n / 128) * kb + g]; }
};

struct W4Scales {  // scales [N, K / group] (widened to fp32 by the glue)
    const float* __restrict__ s;
    int groups, size;
    static constexpr bool per_row = false;
    __device__ __forceinline__ int group() const { return size; }
    __device__ __forceinline__ float col(int n, int g) const { return s[(long long)n * groups + g]; }
};

struct Fp4Scales {  // mxfp4: E8M0 codes [N, ceil(K / 32)]; nvfp4: e4m3fn codes [N, ceil(K / 16)] x tensor scale
    const unsigned char* __restrict__ codes;
    int groups, size, fmt;
    float tensor_scale;
    static constexpr bool per_row = false;
    __device__ __forceinline__ int group() const { return size; }
    __device__ __forceinline__ float col(int n, int g) const {
        const unsigned c = codes[(long long)n * groups + g];
        return fmt == HAL_FMT_MXFP4 ? e8m0_to_float(c) : fp8_to_float(c, HAL_FMT_FP8_E4M3FN) * tensor_scale;
    }
};

struct NoScales {  // int8: one integer sum, scaled in the epilogue
    static constexpr bool per_row = false;
};

template <class Scales> struct Promotes { static constexpr bool value = true; };
template <> struct Promotes<NoScales> { static constexpr bool value = false; };

// Does the 16-deep k step ending at k_end (exclusive, <= K) close a scale group? Its group index.
template <class Scales>
__device__ __forceinline__ bool closes_group(const Scales& sc, int k_end, int K, int& g) {
    if constexpr (Promotes<Scales>::value) {
        g = (k_end - 1) / sc.group();
        return k_end % sc.group() == 0 || k_end == K;
    } else {
        (void)sc, (void)k_end, (void)K, g = 0;
        return false;
    }
}

// ====================================================================== MFMA engine (CDNA, wave64)
// Each wave owns one 32 x 32 MFMA tile of rows wm .. +31 x positions wn .. +31: 16 accumulators per
// lane (col = lane % 32, row = 8 (r / 4) + 4 (lane / 32) + r % 4), plus 16 partials of the current
// scale group. A 64 x 64 block tile (BN = 64) is four such tiles. A 64 x 32 tile (BN = 32, the
// weight-only kernels: decode-shaped calls are bound by reading weights, and narrower tiles give
// more blocks to read them) is two, so the waves pair up and split k instead: waves 2 and 3 take the
// odd 16-deep steps, and add their sums into waves 0 and 1 through LDS at the end.
//
// One k step is 16 deep: a lane takes 8 consecutive k of its row of A and of its position of B
// (k = 8 (lane / 32) .. +7), the CDNA3 one-byte layout, which also feeds f16 / bf16: the two
// 4-element halves go through two 32x32x8 MFMAs, summing k 0..3 + 8..11 and 4..7 + 12..15 of the
// step. So one LDS layout and one fragment load serve every input type.
//
// LDS: A and B k-slices [rows][MFMA_BK + 8] of the staged type, both k-contiguous like memory (no
// transpose: b is [N, K]). Row strides 144 B (f16) / 72 B (bytes) make the fragment loads conflict
// free: ds_read_b128 serves 8 lanes at a time, rows r..r+7 start at dword 36 r = 4 r (mod 32), eight
// disjoint 4-bank groups; ds_read_b64 serves 16 lanes, rows start at dword 18 r: 16 distinct even banks.
#define MFMA_BK 64
#define MFMA_ROW (MFMA_BK + 8)

__device__ __forceinline__ void mfma_k16(float d[16], const __half (&a)[8], const __half (&b)[8]) {
    mfma_f32_32x32x8_f16(d, a, b, d);  // d may alias c: the wrappers read c first
    mfma_f32_32x32x8_f16(d, a + 4, b + 4, d);
}
__device__ __forceinline__ void mfma_k16(float d[16], const hip_bfloat16 (&a)[8], const hip_bfloat16 (&b)[8]) {
    mfma_f32_32x32x8_bf16(d, a, b, d);
    mfma_f32_32x32x8_bf16(d, a + 4, b + 4, d);
}
__device__ __forceinline__ void mfma_k16(float d[16], const unsigned char (&a)[8], const unsigned char (&b)[8]) {  // e4m3fnuz codes
    unsigned ra[2], rb[2];
    __builtin_memcpy(ra, a, 8);
    __builtin_memcpy(rb, b, 8);
    mfma_f32_32x32x16_fp8(d, ra, rb, d);
}
__device__ __forceinline__ void mfma_k16(int d[16], const unsigned char (&a)[8], const unsigned char (&b)[8]) {  // int8
    unsigned ra[2], rb[2];
    __builtin_memcpy(ra, a, 8);
    __builtin_memcpy(rb, b, 8);
    mfma_i32_32x32x16_i8(d, ra, rb, d);
}

template <typename S, typename Acc, int BN = QG_BN>
struct MfmaEngine {
    static_assert(BN == 64 || BN == 32, "four waves: 2 x 2 tiles, or 2 tiles x 2 k halves");
    static constexpr int kSplit = 64 / BN;  // waves sharing one 32 x 32 tile, each on every kSplit-th step
    static constexpr int kBytesA = QG_BM * MFMA_ROW * (int)sizeof(S);
    static constexpr int kLdsBytes = kBytesA + BN * MFMA_ROW * (int)sizeof(S);  // 18 / 13.5 KiB f16, 9 KiB bytes
    static constexpr int kChunksA = QG_BM * MFMA_BK / QG_CHUNK / QG_THREADS;   // 8-element chunks per thread
    static constexpr int kChunksB = BN * MFMA_BK / QG_CHUNK / QG_THREADS;
    static_assert(kSplit == 1 || QG_BM * 32 * (int)sizeof(Acc) <= kLdsBytes, "the k-split sums fit the slices");
    static constexpr int kPositions = BN;
    Acc acc[16];

    // Wave w: rows 32 (w % 2); BN = 64: positions 32 (w / 2); BN = 32: k part w / 2.
    __device__ __forceinline__ static int wave_m() { return (threadIdx.x / 64 % 2) * 32; }
    __device__ __forceinline__ static int wave_n() { return kSplit == 1 ? (int)(threadIdx.x / 128) * 32 : 0; }
    __device__ __forceinline__ static int k_part() { return kSplit == 1 ? 0 : (int)(threadIdx.x / 128); }

    template <class SrcA, class SrcB, class Scales>
    __device__ __forceinline__ void run(unsigned char* lds, const SrcA& A, const SrcB& B, const Scales& sc, const Tile& t, int K) {
        S* As = reinterpret_cast<S*>(lds);
        S* Bs = reinterpret_cast<S*>(lds + kBytesA);
        const int tid = threadIdx.x, lane = tid % 64, wm = wave_m(), wn = wave_n(), kp = k_part();

        // Staging: chunk c = tid + 256 i covers row c / 8, k (c % 8) * 8 of the slice; 8 threads per
        // row, so a wave loads 8 rows x 64 k.
        constexpr int per_row = MFMA_BK / QG_CHUNK;
        const int k_in = (tid % per_row) * QG_CHUNK;
        int a_row[kChunksA], b_row[kChunksB];
#pragma unroll
        for (int i = 0; i < kChunksA; ++i) {
            const int r = (tid + QG_THREADS * i) / per_row;
            a_row[i] = r < t.rows ? t.row0 + r : -1;
        }
#pragma unroll
        for (int i = 0; i < kChunksB; ++i) b_row[i] = t.weight_row((tid + QG_THREADS * i) / per_row);
        typename SrcA::Chunk ra[kChunksA];
        typename SrcB::Chunk rb[kChunksB];
        auto fetch = [&](int k0) {
            const int k = k0 + k_in;
#pragma unroll
            for (int i = 0; i < kChunksA; ++i) {
                ra[i] = {};
                if (a_row[i] >= 0 && k < K) A.load(a_row[i], k, ra[i]);
            }
#pragma unroll
            for (int i = 0; i < kChunksB; ++i) {
                rb[i] = {};
                if (b_row[i] >= 0 && k < K) B.load(b_row[i], k, rb[i]);
            }
        };

        const int n_lane = t.weight_row(wn + lane % 32);  // this lane's position, for the scale factors
        Acc part[16];
#pragma unroll
        for (int r = 0; r < 16; ++r) acc[r] = part[r] = Acc();

        fetch(0);
        for (int k0 = 0; k0 < K; k0 += MFMA_BK) {
            S v[QG_CHUNK];
#pragma unroll
            for (int i = 0; i < kChunksA; ++i) {
                A.decode(ra[i], v);
                __builtin_memcpy(As + ((tid + QG_THREADS * i) / per_row) * MFMA_ROW + k_in, v, sizeof(v));
            }
#pragma unroll
            for (int i = 0; i < kChunksB; ++i) {
                B.decode(rb[i], v);
                __builtin_memcpy(Bs + ((tid + QG_THREADS * i) / per_row) * MFMA_ROW + k_in, v, sizeof(v));
            }
            __syncthreads();
            if (k0 + MFMA_BK < K) fetch(k0 + MFMA_BK);  // global loads in flight during the MFMAs
#pragma unroll
            for (int kk = 0; kk < MFMA_BK; kk += 16) {
                if (k0 + kk >= K) continue;  // the same for the whole block (continue: a constant trip count unrolls)
                int g;
                const bool close = closes_group(sc, min(k0 + kk + 16, K), K, g);
                // The group's scales are loaded before the MFMA so that their latency hides behind it.
                float col_f = 0.0f, row_f[16] = {};
                if (close) {
                    if constexpr (Promotes<Scales>::value) col_f = n_lane >= 0 ? sc.col(n_lane, g) : 0.0f;
                    if constexpr (Scales::per_row) {
#pragma unroll
                        for (int r = 0; r < 16; ++r) {
                            const int i = wm + 8 * (r / 4) + 4 * (lane / 32) + r % 4;
                            row_f[r] = i < t.rows ? sc.row(t.row0 + i, g) : 0.0f;
                        }
                    }
                }
                if ((kk / 16) % kSplit == kp) {  // per wave: which half of the steps it takes
                    const int k = kk + 8 * (lane / 32);
                    S af[8], bf[8];
                    __builtin_memcpy(af, __builtin_assume_aligned(As + (wm + lane % 32) * MFMA_ROW + k, 8 * sizeof(S)), sizeof(af));
                    __builtin_memcpy(bf, __builtin_assume_aligned(Bs + (wn + lane % 32) * MFMA_ROW + k, 8 * sizeof(S)), sizeof(bf));
                    if constexpr (Promotes<Scales>::value) mfma_k16(part, af, bf);
                    else mfma_k16(acc, af, bf);
                }
                if constexpr (Promotes<Scales>::value) {
                    if (close) {  // every wave, including one that sat this step out: its part belongs to the group too
#pragma unroll
                        for (int r = 0; r < 16; ++r) {
                            acc[r] += part[r] * (Scales::per_row ? row_f[r] * col_f : col_f);
                            part[r] = 0.0f;
                        }
                    }
                }
            }
            __syncthreads();  // the next stage overwrites the slices
        }
        if constexpr (kSplit == 2) {  // waves 2, 3 hand their sums to waves 0, 1: [wm / 32][r][lane]
            Acc* sums = reinterpret_cast<Acc*>(lds);
            if (kp == 1) {
#pragma unroll
                for (int r = 0; r < 16; ++r) sums[(wm / 32 * 16 + r) * 64 + lane] = acc[r];
            }
            __syncthreads();
            if (kp == 0) {
#pragma unroll
                for (int r = 0; r < 16; ++r) acc[r] += sums[(wm / 32 * 16 + r) * 64 + lane];
            }
        }
    }

    // store(i, c, v): tile row i, output column col0 + c, fp32 value; only for valid outputs.
    // Gated: lanes 2j and 2j + 1 hold the gate and the up row of one column; one xor-1
    // shuffle (DPP on CDNA) gives the even lane both.
    template <class Store>
    __device__ __forceinline__ void epilogue(const Tile& t, Store store) const {
        if (k_part() != 0) return;  // whole waves
        const int lane = threadIdx.x % 64, wm = wave_m(), p = wave_n() + lane % 32;
#pragma unroll
        for (int r = 0; r < 16; ++r) {
            const int i = wm + 8 * (r / 4) + 4 * (lane / 32) + r % 4;
            const float v = (float)acc[r];
            if (t.gated) {
                const float up = warp_shfl_xor(v, 1);
                if (!(p & 1) && i < t.rows && t.col0 + p / 2 < t.n_out) store(i, p / 2, activate(v, t.activation) * up);
            } else if (i < t.rows && t.col0 + p < t.n_out) {
                store(i, p, activate(v, t.activation));
            }
        }
    }
};

// ====================================================================== SIMT engine (every target)
// 16 x 16 threads; thread (ty, tx) owns tile rows 4 ty .. +3 and positions 4 tx .. +3 (two gate / up
// pairs when gated). Both slices are staged k-major ([k][row], transposed while storing) so that a
// thread's 4 rows and 4 positions are one 16-byte LDS read each; per k, 16 lanes share an A read
// (broadcast) and read 16 consecutive B vectors. Rows padded to 68 elements as in gemm_simt.
#define SIMT_BK 32
#define SIMT_ROW (QG_BM + 4)

template <typename S, typename Acc>
struct SimtEngine {
    static constexpr int kOperandBytes = SIMT_BK * SIMT_ROW * (int)sizeof(S);
    static constexpr int kLdsBytes = 2 * kOperandBytes;  // 17 KiB
    static constexpr int kPositions = QG_BN;
    Acc acc[4][4];

    template <class SrcA, class SrcB, class Scales>
    __device__ __forceinline__ void run(unsigned char* lds, const SrcA& A, const SrcB& B, const Scales& sc, const Tile& t, int K) {
        S* As = reinterpret_cast<S*>(lds);
        S* Bs = reinterpret_cast<S*>(lds + kOperandBytes);
        const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
        // Staging: 64 rows x 32 k = one 8-element chunk per thread and operand: row tid / 4, k (tid % 4) * 8.
        const int r_in = tid / (SIMT_BK / QG_CHUNK), k_in = (tid % (SIMT_BK / QG_CHUNK)) * QG_CHUNK;
        const int a_row = r_in < t.rows ? t.row0 + r_in : -1, b_row = t.weight_row(r_in);
        typename SrcA::Chunk ra;
        typename SrcB::Chunk rb;
        auto fetch = [&](int k0) {
            const int k = k0 + k_in;
            ra = {};
            rb = {};
            if (a_row >= 0 && k < K) A.load(a_row, k, ra);
            if (b_row >= 0 && k < K) B.load(b_row, k, rb);
        };

        Acc part[4][4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] = part[i][j] = Acc();

        fetch(0);
        for (int k0 = 0; k0 < K; k0 += SIMT_BK) {
            S va[QG_CHUNK], vb[QG_CHUNK];
            A.decode(ra, va);
            B.decode(rb, vb);
#pragma unroll
            for (int e = 0; e < QG_CHUNK; ++e) {
                As[(k_in + e) * SIMT_ROW + r_in] = va[e];
                Bs[(k_in + e) * SIMT_ROW + r_in] = vb[e];
            }
            __syncthreads();
            if (k0 + SIMT_BK < K) fetch(k0 + SIMT_BK);
            // Partial unrolling on purpose: unrolled over the whole slice, the compiler hoists all 64
            // LDS reads of it ahead of the FMAs (180+ VGPRs, 2 waves / SIMD instead of 4).
#pragma unroll 1
            for (int kk = 0; kk < SIMT_BK; kk += 16) {
                if (k0 + kk >= K) break;  // the same for the whole block
                int g;
                const bool close = closes_group(sc, min(k0 + kk + 16, K), K, g);
                float row_f[4] = {}, col_f[4] = {};
                if (close) {
#pragma unroll
                    for (int j = 0; j < 4; ++j) {
                        if constexpr (Promotes<Scales>::value) {
                            const int n = t.weight_row(4 * tx + j);
                            col_f[j] = n >= 0 ? sc.col(n, g) : 0.0f;
                        }
                        if constexpr (Scales::per_row) row_f[j] = 4 * ty + j < t.rows ? sc.row(t.row0 + 4 * ty + j, g) : 0.0f;
                    }
                }
                Acc (&sum)[4][4] = Promotes<Scales>::value ? part : acc;
#pragma unroll 4
                for (int k = kk; k < kk + 16; ++k) {
                    S a4[4], b4[4];
                    __builtin_memcpy(a4, __builtin_assume_aligned(As + k * SIMT_ROW + 4 * ty, 4 * sizeof(S)), sizeof(a4));
                    __builtin_memcpy(b4, __builtin_assume_aligned(Bs + k * SIMT_ROW + 4 * tx, 4 * sizeof(S)), sizeof(b4));
#pragma unroll
                    for (int i = 0; i < 4; ++i)
#pragma unroll
                        for (int j = 0; j < 4; ++j) sum[i][j] += a4[i] * b4[j];
                }
                if constexpr (Promotes<Scales>::value) {
                    if (close) {
#pragma unroll
                        for (int i = 0; i < 4; ++i)
#pragma unroll
                            for (int j = 0; j < 4; ++j) {
                                acc[i][j] += part[i][j] * (Scales::per_row ? row_f[i] * col_f[j] : col_f[j]);
                                part[i][j] = 0.0f;
                            }
                    }
                }
            }
            __syncthreads();
        }
    }

    template <class Store>
    __device__ __forceinline__ void epilogue(const Tile& t, Store store) const {
        const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            if (4 * ty + i >= t.rows) continue;
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int p = 4 * tx + j;
                if (t.gated) {
                    if (j % 2 == 0 && t.col0 + p / 2 < t.n_out) store(4 * ty + i, p / 2, activate((float)acc[i][j], t.activation) * (float)acc[i][j + 1]);
                } else if (t.col0 + p < t.n_out) {
                    store(4 * ty + i, p, activate((float)acc[i][j], t.activation));
                }
            }
        }
    }
};

// ====================================================================== the kernels
// Each __global__ names its Engine, owns its LDS (static, 16-byte aligned) and hands it to the shared body.
#define QG_LDS __shared__ uint4 lds_[Engine::kLdsBytes / 16]

// ---------------------------------------------------------------- fp8 block-scaled (plain and grouped)
#define FP8_GEMM_PARAMS                                                                                                       \
    const unsigned char *__restrict__ a, const float *__restrict__ a_scales, const unsigned char *__restrict__ b,             \
        const float *__restrict__ b_scales, const int *__restrict__ expert_rows, To *__restrict__ out, int rows, int n_out,   \
        int K, int experts, int rows_per_expert, int fp8_format, int activation, int gated
#define FP8_GEMM_ARGS a, a_scales, b, b_scales, expert_rows, out, rows, n_out, K, experts, rows_per_expert, fp8_format, activation, gated

// LDS besides the engine's slices: the grouped row tile the block found.
#define FP8_LDS QG_LDS; __shared__ RowTile rows_

template <class Engine, typename To>
__device__ __forceinline__ void fp8_gemm(unsigned char* lds, RowTile* shared_rows, FP8_GEMM_PARAMS) {
    const RowTile r = expert_row_tile<QG_BM>(expert_rows, experts, rows, rows_per_expert, shared_rows);
    if (r.rows <= 0) return;  // uniform: the block has nothing to do
    const Tile t = block_tile(r, n_out, gated, QG_BN, activation);
    if (t.expert < 0) {
        zero_rows(out, r, t.col0, t.columns(), n_out);
        return;
    }
    const int nw = n_out * (gated ? 2 : 1), kb = (K + 127) / 128;
    const ByteRows A{a, K, fp8_format}, B{b + (long long)t.expert * nw * K, K, fp8_format};
    const Fp8BlockScales sc{a_scales, b_scales + (long long)t.expert * ((nw + 127) / 128) * kb, kb};
    Engine engine;
    engine.run(lds, A, B, sc, t, K);
    engine.epilogue(t, [&](int i, int c, float v) { out[(long long)(t.row0 + i) * n_out + t.col0 + c] = from_float<To>(v); });
}

template <typename To>
__global__ __launch_bounds__(QG_THREADS) void fp8_gemm_simt(FP8_GEMM_PARAMS) {
    using Engine = SimtEngine<float, float>;
    FP8_LDS;
    fp8_gemm<Engine>(reinterpret_cast<unsigned char*>(lds_), &rows_, FP8_GEMM_ARGS);
}

template <typename To>
__global__ __launch_bounds__(QG_THREADS) void fp8_gemm_mfma(FP8_GEMM_PARAMS) {
    using Engine = MfmaEngine<__half, float>;
    FP8_LDS;
    fp8_gemm<Engine>(reinterpret_cast<unsigned char*>(lds_), &rows_, FP8_GEMM_ARGS);
}

// e4m3fnuz only (what gfx94x reads); the glue sends e4m3fn to fp8_gemm_mfma.
template <typename To>
__global__ __launch_bounds__(QG_THREADS) void fp8_gemm_mfma_fp8(FP8_GEMM_PARAMS) {
    using Engine = MfmaEngine<unsigned char, float>;
    FP8_LDS;
    fp8_gemm<Engine>(reinterpret_cast<unsigned char*>(lds_), &rows_, FP8_GEMM_ARGS);
}

// ---------------------------------------------------------------- int8 (W8A8)
// out = float(exact int32 sum) * a_scale * b_scale + bias, in fp32.
#define INT8_GEMM_PARAMS                                                                                                          \
    const signed char *__restrict__ a, const signed char *__restrict__ b, const float *__restrict__ a_scales,                    \
        const float *__restrict__ b_scales, const float *__restrict__ bias, To *__restrict__ out, int M, int N, int K, int a_per_row, \
        int b_per_row
#define INT8_GEMM_ARGS a, b, a_scales, b_scales, bias, out, M, N, K, a_per_row, b_per_row

template <class Engine, typename To>
__device__ __forceinline__ void int8_gemm(unsigned char* lds, INT8_GEMM_PARAMS) {
    const Tile t = plain_tile(M, N);
    if (t.rows <= 0) return;
    const ByteRows A{reinterpret_cast<const unsigned char*>(a), K, 0}, B{reinterpret_cast<const unsigned char*>(b), K, 0};
    Engine engine;
    engine.run(lds, A, B, NoScales{}, t, K);
    engine.epilogue(t, [&](int i, int c, float v) {
        const int m = t.row0 + i, n = t.col0 + c;
        v = v * a_scales[a_per_row ? m : 0] * b_scales[b_per_row ? n : 0];
        if (bias) v += bias[n];
        out[(long long)m * N + n] = from_float<To>(v);
    });
}

template <typename To>
__global__ __launch_bounds__(QG_THREADS) void int8_gemm_simt(INT8_GEMM_PARAMS) {
    using Engine = SimtEngine<int, int>;
    QG_LDS;
    int8_gemm<Engine>(reinterpret_cast<unsigned char*>(lds_), INT8_GEMM_ARGS);
}

template <typename To>
__global__ __launch_bounds__(QG_THREADS) void int8_gemm_mfma(INT8_GEMM_PARAMS) {
    using Engine = MfmaEngine<unsigned char, int>;
    QG_LDS;
    int8_gemm<Engine>(reinterpret_cast<unsigned char*>(lds_), INT8_GEMM_ARGS);
}

// ---------------------------------------------------------------- weight-only 4-bit: int4 (w4a16) and fp4
// The MFMA variants stage activations as T and weights as exact T values (q - zero, E2M1), so
// T is the MFMA input type (f16 / bf16); the SIMT variants stage fp32 and take every T.

template <class Engine, typename T, class Scales>
__device__ __forceinline__ void weight_only_gemm(unsigned char* lds, const T* __restrict__ a, const NibbleRows& B, const Scales& sc,
                                                 T* __restrict__ out, int M, int N, int K) {
    const Tile t = plain_tile(M, N, Engine::kPositions);
    if (t.rows <= 0) return;
    Engine engine;
    engine.run(lds, RowsOf<T>{a, K}, B, sc, t, K);
    engine.epilogue(t, [&](int i, int c, float v) { out[(long long)(t.row0 + i) * N + t.col0 + c] = from_float<T>(v); });
}

#define W4A16_GEMM_PARAMS                                                                                  \
    const T *__restrict__ a, const unsigned char *__restrict__ b_packed, const float *__restrict__ scales, \
        const unsigned char *__restrict__ zeros, T *__restrict__ out, int M, int N, int K, int group_size
#define W4A16_GEMM_ARGS a, b_packed, scales, zeros, out, M, N, K, group_size

template <class Engine, typename T>
__device__ __forceinline__ void w4a16_gemm(unsigned char* lds, W4A16_GEMM_PARAMS) {
    weight_only_gemm<Engine>(lds, a, NibbleRows{b_packed, zeros, K, group_size, 0}, W4Scales{scales, K / group_size, group_size}, out, M, N, K);
}

template <typename T>
__global__ __launch_bounds__(QG_THREADS) void w4a16_gemm_simt(W4A16_GEMM_PARAMS) {
    using Engine = SimtEngine<float, float>;
    QG_LDS;
    w4a16_gemm<Engine>(reinterpret_cast<unsigned char*>(lds_), W4A16_GEMM_ARGS);
}

template <typename T>
__global__ __launch_bounds__(QG_THREADS) void w4a16_gemm_mfma(W4A16_GEMM_PARAMS) {
    using Engine = MfmaEngine<T, float, 32>;
    QG_LDS;
    w4a16_gemm<Engine>(reinterpret_cast<unsigned char*>(lds_), W4A16_GEMM_ARGS);
}

// fmt 1 mxfp4 (E8M0 scale codes per 32), 2 nvfp4 (e4m3fn scale codes per 16, times *tensor_scale).
#define FP4_GEMM_PARAMS                                                                                              \
    const T *__restrict__ a, const unsigned char *__restrict__ b_packed, const unsigned char *__restrict__ b_scales, \
        const float *__restrict__ tensor_scale, T *__restrict__ out, int M, int N, int K, int fmt
#define FP4_GEMM_ARGS a, b_packed, b_scales, tensor_scale, out, M, N, K, fmt

template <class Engine, typename T>
__device__ __forceinline__ void fp4_gemm(unsigned char* lds, FP4_GEMM_PARAMS) {
    const int group = fmt == HAL_FMT_MXFP4 ? 32 : 16;
    const Fp4Scales sc{b_scales, (K + group - 1) / group, group, fmt, fmt == HAL_FMT_NVFP4 ? *tensor_scale : 1.0f};
    weight_only_gemm<Engine>(lds, a, NibbleRows{b_packed, nullptr, K, group, 1}, sc, out, M, N, K);
}

template <typename T>
__global__ __launch_bounds__(QG_THREADS) void fp4_gemm_simt(FP4_GEMM_PARAMS) {
    using Engine = SimtEngine<float, float>;
    QG_LDS;
    fp4_gemm<Engine>(reinterpret_cast<unsigned char*>(lds_), FP4_GEMM_ARGS);
}

template <typename T>
__global__ __launch_bounds__(QG_THREADS) void fp4_gemm_mfma(FP4_GEMM_PARAMS) {
    using Engine = MfmaEngine<T, float, 32>;
    QG_LDS;
    fp4_gemm<Engine>(reinterpret_cast<unsigned char*>(lds_), FP4_GEMM_ARGS);
}
