// Quantized GEMMs: out = a @ b.T with low-precision operands. A vendor file because the hardware
// changes the algorithm: which 8-bit matrix instructions exist (mma.m16n8k32 e4m3 from sm_89, s8
// from sm_80) decides how operands are staged and decoded (docs/hardware.md).
// ops/qgemm.py is the executable
// semantics, docs/gpu-kernels.md ("Quantized GEMM kernels") the ABI, backends/gpu/launch_qgemm.py
// the launch glue. Weights are [N, K] (K contiguous), like a, so both operands are "rows of K".
//
//   fp8_gemm_simt<To>       fp8 block-scaled GEMM (plain or grouped per expert, fused activation,
//                           optionally gated), fp32 FMA on decoded operands, any architecture
//   fp8_gemm_mma<To>        the same on mma.m16n8k16 f16: fp8 bytes moved into f16 fields (sm_80+)
//   fp8_gemm_mma_fp8<To>    the same on mma.m16n8k32 with e4m3 inputs (compiles for sm_89+, fp8 tensor cores on sm_89; e4m3fn only)
//   int8_gemm_simt<To>      W8A8 with int32 accumulation
//   int8_gemm_mma<To>       the same on mma.m16n8k32 s8 -> s32 (sm_80+): exact
//   w4a16_gemm_simt<T>      int4 weights (group scales, optional zero points) x float activations
//   w4a16_gemm_mma<T>       the same on mma.m16n8k16, weights decoded in registers (T = f16 / bf16)
//   fp4_gemm_simt<T>        E2M1 weights with MX (E8M0 / 32) or NVFP4 (e4m3 / 16 x fp32) scales
//   fp4_gemm_mma<T>         the same on mma.m16n8k16, weights decoded in registers
//
// Every block computes a tile of 64 a-rows; grid.x walks row tiles, grid.y column tiles. Edges are
// bounds-checked, so any size works. Scales never go into the 8- or 16-bit matrix operands (they
// would round there): the matrix variants feed exact small values (fp8, int8, int4 - zero, E2M1)
// and multiply each partial sum by its scales in fp32 when its scale group ends ("promotion",
// DeepSeek's every-128-K scheme for fp8); the SIMT variants work in fp32 and scale on staging,
// except fp8, whose scales multiply each 128-k block's partial sum there too: an inf scale must
// give inf, not NaN from inf * a zero element (the rule of docs/conformance.md).
#include "hal_gpu.h"

#define QG_TILE 64           // a rows, and weight rows, per block tile
#define QG_SCALE_BLOCK 128   // fp8 scale blocks: 1 x 128 for a, 128 x 128 for b

__device__ __forceinline__ int cdiv(int a, int b) { return (a + b - 1) / b; }

// Sixteen bytes of a row from p: one 16-byte load when `vec` (the caller checked alignment), else
// byte by byte; bytes at or past `valid` are 0.
__device__ __forceinline__ uint4 load16_bytes(const unsigned char* p, int valid, bool vec) {
    if (vec && valid >= 16) return *reinterpret_cast<const uint4*>(p);
    unsigned w[4] = {0u, 0u, 0u, 0u};
    for (int i = 0; i < 16; ++i)
        if (i < valid) w[i >> 2] |= (unsigned)p[i] << (8 * (i & 3));
    return make_uint4(w[0], w[1], w[2], w[3]);
}

// ================================================================ rows and columns of a block
// The a rows of an fp8 block come from expert_row_tile<QG_TILE> (hal_gpu.h: grouped tiles of the
// contiguous and the masked layout, zero tiles, plain GEMMs without expert rows); weight_row,
// store_pair and zero_rows are there too.

// Output columns of an fp8 block: 64, or 32 when gated (positions pair up as gate / up
// rows, see weight_row in hal_gpu.h).
__device__ __forceinline__ int fp8_columns(int gated) { return gated ? QG_TILE / 2 : QG_TILE; }

// int8: out = int32 sum * a_scale * b_scale + bias in fp32, rounded once.
template <typename To>
__device__ __forceinline__ void store_int8(To* __restrict__ out, const float* __restrict__ a_scales, const float* __restrict__ b_scales,
                                           const float* __restrict__ bias, int M, int N, int row, int col, int acc, int a_per_row, int b_per_row) {
    if (row >= M || col >= N) return;
    float v = (float)acc * a_scales[a_per_row ? row : 0] * b_scales[b_per_row ? col : 0];
    if (bias) v += bias[col];
    out[(long long)row * N + col] = from_float<To>(v);
}

// ================================================================ weight decoders (w4a16, fp4)
// A 4-bit weight of column n at k is decoded in two parts: `code(nibble, param)` is a small value
// that is exact in f16 and bf16 (what the matrix variants feed the mma), `param` the per-16-k
// value it needs (a zero point, an nvfp4 block scale); `group_scale(n, k)` multiplies the partial
// sums of a scale group in fp32, every `group_mask + 1` k (a power of two), or once at the end of
// K when group_mask is all ones. The SIMT variants use code * group_scale directly.

struct Int4Weights {
    const unsigned char* __restrict__ packed;  // [N, K / 2], low nibble first
    const float* __restrict__ scales;          // [N, K / group]
    const unsigned char* __restrict__ zeros;   // [N, K / group] uint4 zero points, or nullptr: signed int4
    int K, group, groups;

    __device__ __forceinline__ float param(int n, int k) const { return zeros ? (float)zeros[(long long)n * groups + k / group] : 0.0f; }
    // q - zero lies in [-15, 15], signed q in [-8, 7]: exact in every 16-bit float type.
    __device__ __forceinline__ float code(unsigned nibble, float zero) const { return zeros ? (float)nibble - zero : (float)int4_to_int(nibble); }
    __device__ __forceinline__ float group_scale(int n, int k) const { return scales[(long long)n * groups + k / group]; }
    __device__ __forceinline__ int group_mask() const { return group - 1; }
};

// fp4_gemm's `fmt`: HAL_FMT_MXFP4 has an E8M0 scale per 32, a power of two promoted per group (it may
// exceed f16's range); HAL_FMT_NVFP4 an e4m3fn scale per 16, folded into the code (E2M1 x e4m3 has 6
// significant bits: exact in f16 and bf16), and one fp32 tensor scale at the end.

struct Fp4Weights {
    const unsigned char* __restrict__ packed;  // [N, K / 2] E2M1 codes
    const unsigned char* __restrict__ scales;  // [N, ceil(K / 32)] E8M0 or [N, ceil(K / 16)] e4m3fn codes
    const float* __restrict__ tensor_scale;    // nvfp4: [1]
    int K, fmt, groups;

    __device__ __forceinline__ float param(int n, int k) const {
        return fmt == HAL_FMT_NVFP4 ? fp8_to_float(scales[(long long)n * groups + k / 16], HAL_FMT_FP8_E4M3FN) : 1.0f;
    }
    __device__ __forceinline__ float code(unsigned nibble, float block_scale) const { return e2m1_to_float(nibble) * block_scale; }
    __device__ __forceinline__ float group_scale(int n, int k) const {
        return fmt == HAL_FMT_NVFP4 ? tensor_scale[0] : e8m0_to_float(scales[(long long)n * groups + k / 32]);
    }
    __device__ __forceinline__ int group_mask() const { return fmt == HAL_FMT_NVFP4 ? 0x7fffffff : 31; }
};

template <class W>
__device__ __forceinline__ unsigned weight_nibble(const W& w, int n, int k) {
    return (w.packed[(long long)n * (w.K / 2) + k / 2] >> (4 * (k & 1))) & 0xFu;
}

// ================================================================ SIMT engine
// 256 threads as 16 x 16; thread (ty, tx) owns tile rows 4 ty .. + 3 and weight positions 4 tx .. + 3.
// Both operands are staged k-major in shared memory as 32-bit words (fp32 or int32 values) so that
// a thread's 4 rows / positions are one 16-byte read; a row of the staged tile is padded from 64
// to 68 words (the transposing stores then conflict 2-way at worst). Per 16-k slice every thread
// stages 4 elements of each operand (element q = tid + 256 r: row q / 16, k q % 16, so 16 lanes
// read 16 consecutive k of a row), prefetched into registers while the previous slice is multiplied.
// The operands say which matrix row a tile row / position reads (`a_row`, `b_row`, -1 for none;
// resolved once per thread) and give its element at k (`a_value`, `b_value`, 0 past K). Operands
// with a `scale_block` (a multiple of SIMT_BK) are promoted: per block of that many k a fresh
// partial sum, added as part * (a_scale(a row, block) * b_scale(b row, block)) when the block ends.

#define SIMT_THREADS 256
#define SIMT_BK 16
#define SIMT_STRIDE 68

__device__ __forceinline__ unsigned to_word(float v) { return __builtin_bit_cast(unsigned, v); }
__device__ __forceinline__ unsigned to_word(int v) { return (unsigned)v; }
template <typename Acc> __device__ __forceinline__ Acc from_word(unsigned w);
template <> __device__ __forceinline__ float from_word<float>(unsigned w) { return __builtin_bit_cast(float, w); }
template <> __device__ __forceinline__ int from_word<int>(unsigned w) { return (int)w; }

template <typename Acc, class Operands>
__device__ __forceinline__ void simt_tile(const Operands& op, int K, Acc acc[4][4]) {
    __shared__ uint4 a_tile[SIMT_BK * SIMT_STRIDE / 4];
    __shared__ uint4 b_tile[SIMT_BK * SIMT_STRIDE / 4];
    unsigned* a_flat = reinterpret_cast<unsigned*>(a_tile);
    unsigned* b_flat = reinterpret_cast<unsigned*>(b_tile);
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16, kk = tid % SIMT_BK, row = tid / SIMT_BK;

    int a_rows[4], b_rows[4];
    for (int r = 0; r < 4; ++r) {
        a_rows[r] = op.a_row(row + 16 * r);
        b_rows[r] = op.b_row(row + 16 * r);
    }
    constexpr int scale_block = Operands::scale_block;
    Acc part[4][4];
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = part[i][j] = 0;

    unsigned a_next[4], b_next[4];
    const int slices = cdiv(K, SIMT_BK);
    prefetch_main_loop(
        slices,
        [&](int slice) {
            const int k = slice * SIMT_BK + kk;
            for (int r = 0; r < 4; ++r) {
                a_next[r] = to_word(a_rows[r] >= 0 && k < K ? op.a_value(a_rows[r], k) : Acc(0));
                b_next[r] = to_word(b_rows[r] >= 0 && k < K ? op.b_value(b_rows[r], k) : Acc(0));
            }
        },
        [&] {
            for (int r = 0; r < 4; ++r) {
                a_flat[kk * SIMT_STRIDE + row + 16 * r] = a_next[r];
                b_flat[kk * SIMT_STRIDE + row + 16 * r] = b_next[r];
            }
        },
        [&](int slice) {
            Acc (*sum)[4] = scale_block ? part : acc;
            for (int k = 0; k < SIMT_BK; ++k) {
                const uint4 av = a_tile[k * (SIMT_STRIDE / 4) + ty], bv = b_tile[k * (SIMT_STRIDE / 4) + tx];
                const Acc ar[4] = {from_word<Acc>(av.x), from_word<Acc>(av.y), from_word<Acc>(av.z), from_word<Acc>(av.w)};
                const Acc br[4] = {from_word<Acc>(bv.x), from_word<Acc>(bv.y), from_word<Acc>(bv.z), from_word<Acc>(bv.w)};
                for (int i = 0; i < 4; ++i)
                    for (int j = 0; j < 4; ++j) sum[i][j] += ar[i] * br[j];
            }
            if constexpr (scale_block > 0) {
                const int k_end = (slice + 1) * SIMT_BK, kb = (k_end - 1) / scale_block;
                if (k_end % scale_block == 0 || k_end >= K) {
                    float row_scale[4], col_scale[4];  // 0 for rows / positions past the edge (never stored)
                    for (int i = 0; i < 4; ++i) {
                        const int ar = op.a_row(4 * ty + i), br = op.b_row(4 * tx + i);
                        row_scale[i] = ar >= 0 ? op.a_scale(ar, kb) : 0.0f;
                        col_scale[i] = br >= 0 ? op.b_scale(br, kb) : 0.0f;
                    }
                    for (int i = 0; i < 4; ++i)
                        for (int j = 0; j < 4; ++j) {
                            acc[i][j] += part[i][j] * (row_scale[i] * col_scale[j]);
                            part[i][j] = 0;
                        }
                }
            }
        });
}

// fp8 operands decoded on staging, their scales promoted per 128-k block (b and its scales already
// offset to the block's expert; b rows are weight rows, gate / up interleaved as weight_row says).
struct Fp8Operands {
    static constexpr int scale_block = QG_SCALE_BLOCK;
    const unsigned char* __restrict__ a;
    const float* __restrict__ a_scales;
    const unsigned char* __restrict__ b;
    const float* __restrict__ b_scales;
    int row0, rows, c0, n_out, K, k_blocks, fmt, gated;

    __device__ __forceinline__ int a_row(int r) const { return r < rows ? row0 + r : -1; }
    __device__ __forceinline__ int b_row(int p) const { return weight_row(p, c0, n_out, gated); }
    __device__ __forceinline__ float a_value(int row, int k) const { return fp8_to_float(a[(long long)row * K + k], fmt); }
    __device__ __forceinline__ float b_value(int wr, int k) const { return fp8_to_float(b[(long long)wr * K + k], fmt); }
    __device__ __forceinline__ float a_scale(int row, int kb) const { return a_scales[(long long)row * k_blocks + kb]; }
    __device__ __forceinline__ float b_scale(int wr, int kb) const { return b_scales[(wr / QG_SCALE_BLOCK) * k_blocks + kb]; }
};

struct Int8Operands {
    static constexpr int scale_block = 0;  // int32 sums, scaled in the epilogue
    const signed char* __restrict__ a;
    const signed char* __restrict__ b;
    int m0, n0, M, N, K;

    __device__ __forceinline__ int a_row(int r) const { return m0 + r < M ? m0 + r : -1; }
    __device__ __forceinline__ int b_row(int p) const { return n0 + p < N ? n0 + p : -1; }
    __device__ __forceinline__ int a_value(int row, int k) const { return a[(long long)row * K + k]; }
    __device__ __forceinline__ int b_value(int n, int k) const { return b[(long long)n * K + k]; }
};

template <typename T, class W>
struct WeightOnlyOperands {
    static constexpr int scale_block = 0;  // scaled on staging
    const T* __restrict__ a;
    W w;
    int m0, n0, M, N, K;

    __device__ __forceinline__ int a_row(int r) const { return m0 + r < M ? m0 + r : -1; }
    __device__ __forceinline__ int b_row(int p) const { return n0 + p < N ? n0 + p : -1; }
    __device__ __forceinline__ float a_value(int row, int k) const { return to_float(a[(long long)row * K + k]); }
    __device__ __forceinline__ float b_value(int n, int k) const { return w.code(weight_nibble(w, n, k), w.param(n, k)) * w.group_scale(n, k); }
};

template <typename To>
__global__ void __launch_bounds__(SIMT_THREADS)
fp8_gemm_simt(const unsigned char* __restrict__ a, const float* __restrict__ a_scales, const unsigned char* __restrict__ b,
              const float* __restrict__ b_scales, const int* __restrict__ expert_rows, To* __restrict__ out, int rows, int n_out, int K,
              int experts, int rows_per_expert, int fp8_format, int activation, int gated) {
    __shared__ RowTile shared_tile;
    const RowTile tile = expert_row_tile<QG_TILE>(expert_rows, experts, rows, rows_per_expert, &shared_tile);
    const int c0 = blockIdx.y * fp8_columns(gated);
    if (tile.rows <= 0) return;  // block-uniform
    if (tile.expert < 0) {
        zero_rows(out, tile, c0, fp8_columns(gated), n_out);
        return;
    }
    const int nw = gated ? 2 * n_out : n_out, k_blocks = cdiv(K, QG_SCALE_BLOCK);
    const Fp8Operands op{a, a_scales, b + (long long)tile.expert * nw * K, b_scales + (long long)tile.expert * cdiv(nw, QG_SCALE_BLOCK) * k_blocks,
                         tile.row0, tile.rows, c0, n_out, K, k_blocks, fp8_format, gated};
    float acc[4][4];
    simt_tile(op, K, acc);
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    for (int i = 0; i < 4; ++i) {
        if (4 * ty + i >= tile.rows) continue;
        To* out_row = out + (long long)(tile.row0 + 4 * ty + i) * n_out;
        store_pair(out_row, n_out, c0, 4 * tx, acc[i][0], acc[i][1], activation, gated);
        store_pair(out_row, n_out, c0, 4 * tx + 2, acc[i][2], acc[i][3], activation, gated);
    }
}

template <typename To>
__global__ void __launch_bounds__(SIMT_THREADS)
int8_gemm_simt(const signed char* __restrict__ a, const signed char* __restrict__ b, const float* __restrict__ a_scales,
               const float* __restrict__ b_scales, const float* __restrict__ bias, To* __restrict__ out, int M, int N, int K, int a_per_row,
               int b_per_row) {
    const int m0 = blockIdx.x * QG_TILE, n0 = blockIdx.y * QG_TILE;
    int acc[4][4];  // |a b| <= 2^14: exact int32 sums for K < 2^17
    simt_tile(Int8Operands{a, b, m0, n0, M, N, K}, K, acc);
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) store_int8(out, a_scales, b_scales, bias, M, N, m0 + 4 * ty + i, n0 + 4 * tx + j, acc[i][j], a_per_row, b_per_row);
}

template <typename T, class W>
__device__ __forceinline__ void weight_only_simt(const T* __restrict__ a, const W& w, T* __restrict__ out, int M, int N, int K) {
    const int m0 = blockIdx.x * QG_TILE, n0 = blockIdx.y * QG_TILE;
    float acc[4][4];
    simt_tile(WeightOnlyOperands<T, W>{a, w, m0, n0, M, N, K}, K, acc);
    const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) {
            const int row = m0 + 4 * ty + i, col = n0 + 4 * tx + j;
            if (row < M && col < N) out[(long long)row * N + col] = from_float<T>(acc[i][j]);
        }
}

template <typename T>
__global__ void __launch_bounds__(SIMT_THREADS)
w4a16_gemm_simt(const T* __restrict__ a, const unsigned char* __restrict__ b_packed, const float* __restrict__ scales,
                const unsigned char* __restrict__ zeros, T* __restrict__ out, int M, int N, int K, int group_size) {
    weight_only_simt(a, Int4Weights{b_packed, scales, zeros, K, group_size, K / group_size}, out, M, N, K);
}

template <typename T>
__global__ void __launch_bounds__(SIMT_THREADS)
fp4_gemm_simt(const T* __restrict__ a, const unsigned char* __restrict__ b_packed, const unsigned char* __restrict__ b_scales,
              const float* __restrict__ tensor_scale, T* __restrict__ out, int M, int N, int K, int fmt) {
    weight_only_simt(a, Fp4Weights{b_packed, b_scales, tensor_scale, K, fmt, cdiv(K, fmt == HAL_FMT_NVFP4 ? 16 : 32)}, out, M, N, K);
}

// ================================================================ tensor cores: 8-bit operands (fp8, int8)
// 128 threads = 4 warps as 2 x 2 over the 64 x 64 tile, 32 x 32 each = 2 (m16) x 4 (n8) mma tiles.
// Shared memory holds a slice of 64 bytes per row for both operands, [64 rows][64 bytes] padded to
// 80 bytes (20 words): the fragment reads of lane (g, t) hit word 20 g + t, 32 distinct banks.
// That one layout serves three instructions, because their fragments are the same words:
//   m16n8k32 with 8-bit inputs: A registers (row g, bytes 4t..4t+3), (row g + 8, same),
//     (row g, + 16 bytes), (row g + 8, + 16); B "col" registers (weight row g, bytes 4t.., + 16):
//     every register is one 32-bit word of a [row][k] byte tile: 64 k per slice;
//   m16n8k16 f16 on fp8 decoded to f16 halves: the same words of a [row][k] half tile: 32 k per slice.
// Per slice each thread moves 2 chunks of each operand (chunk q = tid + 128 i: row q / 4, 16 bytes
// q % 4 of the row slice; 4 lanes read a row's 64 contiguous bytes), prefetched in registers.

#define MMA_THREADS 128
#define MMA_ROW_UINT4 5
#define MMA_ROW_WORDS 20

// Four e4m3 bytes (two per call) as f16 bit patterns. The byte's exponent and mantissa fields are
// moved into the f16 fields as they are: that reads the exponent with f16's bias 15 instead of 7
// (e4m3fn) or 8 (e4m3fnuz), so the half is the exact value times 2^-8 / 2^-7, for subnormals too
// (an fp8 subnormal lands on an f16 subnormal with the same scaling). The promotion multiplies the
// power of two back in fp32. Two shifts and masks per pair instead of a float conversion per byte.
__device__ __forceinline__ unsigned e4m3_pair_to_f16_pair(unsigned two_bytes) {
    const unsigned x = (two_bytes & 0xFFu) | ((two_bytes & 0xFF00u) << 8);  // byte 0 -> bits 0..7, byte 1 -> 16..23
    return ((x & 0x00800080u) << 8) | ((x & 0x007F007Fu) << 7);
}

__device__ __forceinline__ bool is_fp8_nan(unsigned code, int fmt) { return fmt == HAL_FMT_FP8_E4M3FNUZ ? code == 0x80u : (code & 0x7Fu) == 0x7Fu; }

// Whether any of the four bytes of w is the format's NaN (bytewise tests without carries between bytes).
__device__ __forceinline__ bool has_fp8_nan(unsigned w, int fmt) {
    if (fmt == HAL_FMT_FP8_E4M3FNUZ) {
        const unsigned y = w ^ 0x80808080u;  // a zero byte where w has 0x80
        return ((y - 0x01010101u) & ~y & 0x80808080u) != 0u;
    }
    return (((w & 0x7F7F7F7Fu) + 0x01010101u) & 0x80808080u) != 0u;
}

__device__ __forceinline__ uint4 fp8x8_to_f16x8(uint2 raw, int fmt) {
    unsigned h[4] = {e4m3_pair_to_f16_pair(raw.x), e4m3_pair_to_f16_pair(raw.x >> 16), e4m3_pair_to_f16_pair(raw.y), e4m3_pair_to_f16_pair(raw.y >> 16)};
    if (has_fp8_nan(raw.x, fmt) || has_fp8_nan(raw.y, fmt)) {  // rare: make the NaN codes f16 NaNs
#pragma unroll
        for (int i = 0; i < 8; ++i)
            if (is_fp8_nan(((i < 4 ? raw.x : raw.y) >> (8 * (i & 3))) & 0xFFu, fmt)) h[i >> 1] |= 0x7E00u << (16 * (i & 1));
    }
    return make_uint4(h[0], h[1], h[2], h[3]);
}

// The three ways of filling and multiplying the byte-row tiles.
struct Fp8NativeMode {  // e4m3fn bytes as they are, mma.m16n8k32.e4m3 (sm_89+)
    typedef float Acc;
    static constexpr int kSliceK = 64, kChunkK = 16, kLoadBytes = 16;
    static __device__ __forceinline__ uint4 load(const unsigned char* p, int valid, bool vec, int) { return load16_bytes(p, valid, vec); }
    static __device__ __forceinline__ void mma(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) { mma_m16n8k32_e4m3(d, a, b, c); }
    static __device__ __forceinline__ float unit(int) { return 1.0f; }
};

struct Fp8AsHalfMode {  // 8 fp8 bytes -> 8 f16 (scaled by 2^-8 / 2^-7), mma.m16n8k16.f16 (sm_80+)
    typedef float Acc;
    static constexpr int kSliceK = 32, kChunkK = 8, kLoadBytes = 8;
    static __device__ __forceinline__ uint4 load(const unsigned char* p, int valid, bool vec, int fmt) {
        uint2 raw;
        if (vec && valid >= 8) {
            raw = *reinterpret_cast<const uint2*>(p);
        } else {
            unsigned w[2] = {0u, 0u};
            for (int i = 0; i < 8; ++i)
                if (i < valid) w[i >> 2] |= (unsigned)p[i] << (8 * (i & 3));
            raw = make_uint2(w[0], w[1]);
        }
        return fp8x8_to_f16x8(raw, fmt);
    }
    static __device__ __forceinline__ void mma(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) { mma_m16n8k16_f16(d, a, b, c); }
    // Undo the 2^-8 (2^-7) of both operands: 2^16 (2^14) per product.
    static __device__ __forceinline__ float unit(int fmt) { return fmt == HAL_FMT_FP8_E4M3FNUZ ? 16384.0f : 65536.0f; }
};

struct Int8Mode {  // int8 bytes as they are, mma.m16n8k32.s8 -> s32 (sm_80+)
    typedef int Acc;
    static constexpr int kSliceK = 64, kChunkK = 16, kLoadBytes = 16;
    static __device__ __forceinline__ uint4 load(const unsigned char* p, int valid, bool vec, int) { return load16_bytes(p, valid, vec); }
    static __device__ __forceinline__ void mma(int d[4], const unsigned a[4], const unsigned b[2], const int c[4]) { mma_m16n8k32_s8(d, a, b, c); }
};

// The K loop of a byte-row tile: a_rows / b_rows are this thread's two staged rows of each
// operand (nullptr: a row past the matrix, staged as zeros). frag accumulates per warp; after each
// 128-k scale block (and at the end of K) `after_block(block)` runs, which may read and reset frag.
template <class Mode, class AfterBlock>
__device__ __forceinline__ void byte_tile_loop(const unsigned char* const a_rows[2], const unsigned char* const b_rows[2], int K, int fmt,
                                               bool a_vec, bool b_vec, typename Mode::Acc frag[2][4][4], AfterBlock after_block) {
    __shared__ uint4 a_tile[QG_TILE * MMA_ROW_UINT4];
    __shared__ uint4 b_tile[QG_TILE * MMA_ROW_UINT4];
    const unsigned* a_words = reinterpret_cast<const unsigned*>(a_tile);
    const unsigned* b_words = reinterpret_cast<const unsigned*>(b_tile);
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;  // the mma layouts are defined for 32-lane warps
    const int g = lane >> 2, t = lane & 3;
    const int warp_row = (warp >> 1) * 32, warp_col = (warp & 1) * 32;
    const int k_chunk = Mode::kChunkK * (tid & 3);
    const int slices = cdiv(K, Mode::kSliceK), per_block = QG_SCALE_BLOCK / Mode::kSliceK;

    uint4 a_next[2], b_next[2];
    prefetch_main_loop(
        slices,
        [&](int slice) {  // the next slice is in flight while this one is multiplied
            const int k = slice * Mode::kSliceK + k_chunk;
            for (int i = 0; i < 2; ++i) {
                a_next[i] = a_rows[i] && k < K ? Mode::load(a_rows[i] + k, K - k, a_vec, fmt) : make_uint4(0u, 0u, 0u, 0u);
                b_next[i] = b_rows[i] && k < K ? Mode::load(b_rows[i] + k, K - k, b_vec, fmt) : make_uint4(0u, 0u, 0u, 0u);
            }
        },
        [&] {
            for (int i = 0; i < 2; ++i) {
                const int q = tid + i * MMA_THREADS;
                a_tile[(q >> 2) * MMA_ROW_UINT4 + (q & 3)] = a_next[i];
                b_tile[(q >> 2) * MMA_ROW_UINT4 + (q & 3)] = b_next[i];
            }
        },
        [&](int slice) {
#pragma unroll
            for (int step = 0; step < 2; ++step) {
                const int word = step * 8 + t;
                unsigned af[2][4], bf[4][2];
#pragma unroll
                for (int mi = 0; mi < 2; ++mi) {
                    const int row = warp_row + mi * 16 + g;
                    af[mi][0] = a_words[row * MMA_ROW_WORDS + word];
                    af[mi][1] = a_words[(row + 8) * MMA_ROW_WORDS + word];
                    af[mi][2] = a_words[row * MMA_ROW_WORDS + word + 4];
                    af[mi][3] = a_words[(row + 8) * MMA_ROW_WORDS + word + 4];
                }
#pragma unroll
                for (int ni = 0; ni < 4; ++ni) {
                    const int col = warp_col + ni * 8 + g;
                    bf[ni][0] = b_words[col * MMA_ROW_WORDS + word];
                    bf[ni][1] = b_words[col * MMA_ROW_WORDS + word + 4];
                }
#pragma unroll
                for (int mi = 0; mi < 2; ++mi)
#pragma unroll
                    for (int ni = 0; ni < 4; ++ni) Mode::mma(frag[mi][ni], af[mi], bf[ni], frag[mi][ni]);
            }
            if ((slice + 1) % per_block == 0 || slice + 1 == slices) after_block(slice / per_block);  // registers only
        });
}

// fp8: per 128-k block a fresh fp32 fragment, promoted into the accumulator with
// a_scale[row][block] * b_scale[weight row / 128][block] (times Mode::unit).
template <class Mode, typename To>
__device__ __forceinline__ void fp8_mma_tile(const unsigned char* __restrict__ a, const float* __restrict__ a_scales, const unsigned char* __restrict__ b,
                                             const float* __restrict__ b_scales, const int* __restrict__ expert_rows, To* __restrict__ out, int rows,
                                             int n_out, int K, int experts, int rows_per_expert, int fmt, int activation, int gated) {
    __shared__ RowTile shared_tile;
    const RowTile tile = expert_row_tile<QG_TILE>(expert_rows, experts, rows, rows_per_expert, &shared_tile);
    const int c0 = blockIdx.y * fp8_columns(gated);
    if (tile.rows <= 0) return;  // block-uniform
    if (tile.expert < 0) {
        zero_rows(out, tile, c0, fp8_columns(gated), n_out);
        return;
    }
    const int nw = gated ? 2 * n_out : n_out, k_blocks = cdiv(K, QG_SCALE_BLOCK);
    const unsigned char* b_expert = b + (long long)tile.expert * nw * K;
    const float* bs_expert = b_scales + (long long)tile.expert * cdiv(nw, QG_SCALE_BLOCK) * k_blocks;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int g = lane >> 2, t = lane & 3;
    const int warp_row = (warp >> 1) * 32, warp_col = (warp & 1) * 32;

    const unsigned char* a_rows[2];
    const unsigned char* b_rows[2];
    for (int i = 0; i < 2; ++i) {
        const int r = (tid + i * MMA_THREADS) >> 2, wr = weight_row(r, c0, n_out, gated);
        a_rows[i] = r < tile.rows ? a + (long long)(tile.row0 + r) * K : nullptr;
        b_rows[i] = wr >= 0 ? b_expert + (long long)wr * K : nullptr;
    }
    const int align = Mode::kLoadBytes;
    const bool a_vec = K % align == 0 && reinterpret_cast<unsigned long long>(a) % align == 0;
    const bool b_vec = K % align == 0 && reinterpret_cast<unsigned long long>(b) % align == 0;

    float acc[2][4][4], part[2][4][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[mi][ni][r] = part[mi][ni][r] = 0.0f;

    const float unit = Mode::unit(fmt);
    byte_tile_loop<Mode>(a_rows, b_rows, K, fmt, a_vec, b_vec, part, [&](int block) {
        // This lane's C fragment rows (g, g + 8 of each m16 tile) and positions (2t, 2t + 1 of each n8 tile).
        float row_scale[2][2], col_scale[4][2];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = warp_row + mi * 16 + g + 8 * h;
                row_scale[mi][h] = r < tile.rows ? a_scales[(long long)(tile.row0 + r) * k_blocks + block] * unit : 0.0f;
            }
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int j = 0; j < 2; ++j) {
                const int wr = weight_row(warp_col + ni * 8 + 2 * t + j, c0, n_out, gated);
                col_scale[ni][j] = wr >= 0 ? bs_expert[(wr / QG_SCALE_BLOCK) * k_blocks + block] : 0.0f;
            }
#pragma unroll
        for (int mi = 0; mi < 2; ++mi)
#pragma unroll
            for (int ni = 0; ni < 4; ++ni)
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    acc[mi][ni][r] += part[mi][ni][r] * row_scale[mi][r >> 1] * col_scale[ni][r & 1];
                    part[mi][ni][r] = 0.0f;
                }
    });

    // C fragment: elements (2h, 2h + 1) of tile (mi, ni) are row g + 8h, positions 2t, 2t + 1: a
    // pair. Fully unrolled so that acc is never indexed at run time (which would spill it).
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = warp_row + mi * 16 + g + 8 * h;
            if (r >= tile.rows) continue;
            To* out_row = out + (long long)(tile.row0 + r) * n_out;
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) store_pair(out_row, n_out, c0, warp_col + ni * 8 + 2 * t, acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1], activation, gated);
        }
}

template <typename To>
__global__ void __launch_bounds__(MMA_THREADS)
fp8_gemm_mma(const unsigned char* __restrict__ a, const float* __restrict__ a_scales, const unsigned char* __restrict__ b,
             const float* __restrict__ b_scales, const int* __restrict__ expert_rows, To* __restrict__ out, int rows, int n_out, int K,
             int experts, int rows_per_expert, int fp8_format, int activation, int gated) {
    fp8_mma_tile<Fp8AsHalfMode>(a, a_scales, b, b_scales, expert_rows, out, rows, n_out, K, experts, rows_per_expert, fp8_format, activation, gated);
}

// e4m3fn only (the flavour of NVIDIA's fp8 units): the glue sends e4m3fnuz to fp8_gemm_mma.
template <typename To>
__global__ void __launch_bounds__(MMA_THREADS)
fp8_gemm_mma_fp8(const unsigned char* __restrict__ a, const float* __restrict__ a_scales, const unsigned char* __restrict__ b,
                 const float* __restrict__ b_scales, const int* __restrict__ expert_rows, To* __restrict__ out, int rows, int n_out, int K,
                 int experts, int rows_per_expert, int fp8_format, int activation, int gated) {
    fp8_mma_tile<Fp8NativeMode>(a, a_scales, b, b_scales, expert_rows, out, rows, n_out, K, experts, rows_per_expert, fp8_format, activation, gated);
}

// int8: one int32 fragment over the whole of K (exact), scaled in the epilogue.
template <typename To>
__global__ void __launch_bounds__(MMA_THREADS)
int8_gemm_mma(const signed char* __restrict__ a, const signed char* __restrict__ b, const float* __restrict__ a_scales,
              const float* __restrict__ b_scales, const float* __restrict__ bias, To* __restrict__ out, int M, int N, int K, int a_per_row,
              int b_per_row) {
    const int m0 = blockIdx.x * QG_TILE, n0 = blockIdx.y * QG_TILE;
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int g = lane >> 2, t = lane & 3;
    const int warp_row = (warp >> 1) * 32, warp_col = (warp & 1) * 32;
    const unsigned char* a_bytes = reinterpret_cast<const unsigned char*>(a);
    const unsigned char* b_bytes = reinterpret_cast<const unsigned char*>(b);
    const unsigned char* a_rows[2];
    const unsigned char* b_rows[2];
    for (int i = 0; i < 2; ++i) {
        const int r = (tid + i * MMA_THREADS) >> 2;
        a_rows[i] = m0 + r < M ? a_bytes + (long long)(m0 + r) * K : nullptr;
        b_rows[i] = n0 + r < N ? b_bytes + (long long)(n0 + r) * K : nullptr;
    }
    const bool a_vec = K % 16 == 0 && reinterpret_cast<unsigned long long>(a) % 16 == 0;
    const bool b_vec = K % 16 == 0 && reinterpret_cast<unsigned long long>(b) % 16 == 0;

    int acc[2][4][4];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int r = 0; r < 4; ++r) acc[mi][ni][r] = 0;
    byte_tile_loop<Int8Mode>(a_rows, b_rows, K, 0, a_vec, b_vec, acc, [](int) {});

#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int r = 0; r < 4; ++r)
                store_int8(out, a_scales, b_scales, bias, M, N, m0 + warp_row + mi * 16 + g + 8 * (r >> 1), n0 + warp_col + ni * 8 + 2 * t + (r & 1),
                           acc[mi][ni][r], a_per_row, b_per_row);
}

// ================================================================ tensor cores: 4-bit weights (w4a16, fp4)
// Decode-shaped calls (M of 1..16) are the common case and are bound by reading the weights, so a
// block covers 64 a-rows x 32 output columns and every warp owns 8 columns (one n8 tile) over all
// rows: a weight is decoded once per block, by the one lane that feeds it to the mma, and a block
// stages and multiplies only the m16 tiles that hold rows (M = 1: one tile, one mma per 16 k per
// warp). The grid has N / 32 column blocks: 128 for N = 4096, enough to keep the SMs loading.
//
// Per 128-k slice: the a tile [64 rows][128 halves] padded to 136 (68 words: fragment reads hit
// 68 g + t, 32 distinct banks), up to 8 chunks of 8 halves per thread (rows (tid / 16) + 8 i); the
// packed weights [32 rows][64 bytes] padded to 80 bytes, one 16-byte chunk per thread. A lane then
// reads its weight row's 64 bytes (4 x 16-byte reads, broadcast to the 4 lanes of a row, rows in
// distinct banks), and per 16-k step decodes the 4 nibbles of its B fragment: column g, k 2t, 2t + 1
// (byte t of the step's 8 bytes) and 2t + 8, 2t + 9 (byte t + 4).

#define WO_COLS 32
#define WO_BK 128
#define WO_A_ROW_UINT4 17
#define WO_A_ROW_WORDS 68
#define WO_B_ROW_UINT4 5

template <typename T>
__device__ __forceinline__ unsigned pack_pair(float lo, float hi) {
    return (unsigned)__builtin_bit_cast(unsigned short, from_float<T>(lo)) | ((unsigned)__builtin_bit_cast(unsigned short, from_float<T>(hi)) << 16);
}

template <typename T, class W>
__device__ __forceinline__ void weight_only_mma(const T* __restrict__ a, const W& w, T* __restrict__ out, int M, int N, int K) {
    __shared__ uint4 a_tile[QG_TILE * WO_A_ROW_UINT4];
    __shared__ uint4 b_tile[WO_COLS * WO_B_ROW_UINT4];
    const unsigned* a_words = reinterpret_cast<const unsigned*>(a_tile);
    const unsigned short* a_bits = reinterpret_cast<const unsigned short*>(a);
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
    const int g = lane >> 2, t = lane & 3;
    const int m0 = blockIdx.x * QG_TILE, n0 = blockIdx.y * WO_COLS;
    const int rows = min(QG_TILE, M - m0), m_tiles = cdiv(rows, 16);  // block-uniform
    const int b_col = n0 + warp * 8 + g;                               // the weight row this lane decodes
    const int c_col = n0 + warp * 8 + 2 * t;                           // its C fragment columns c_col, c_col + 1
    const int row_bytes = K / 2;
    const bool a_vec = K % 8 == 0 && reinterpret_cast<unsigned long long>(a) % 16 == 0;
    const bool b_vec = row_bytes % 16 == 0 && reinterpret_cast<unsigned long long>(w.packed) % 16 == 0;
    const unsigned char* b_src = n0 + (tid >> 2) < N ? w.packed + (long long)(n0 + (tid >> 2)) * row_bytes : nullptr;

    float acc[4][4], part[4][4];
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[mi][r] = part[mi][r] = 0.0f;

    uint4 a_next[8], b_next;
    const int slices = cdiv(K, WO_BK);
    prefetch_main_loop(
        slices,
        [&](int slice) {  // prefetch: rows past M in a live m16 tile are staged as zeros
            const int k = slice * WO_BK + 8 * (tid & 15);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const int r = (tid >> 4) + 8 * i;
                a_next[i] = make_uint4(0u, 0u, 0u, 0u);
                if (r < rows && k < K) {
                    const unsigned short* p = a_bits + (long long)(m0 + r) * K + k;
                    a_next[i] = a_vec ? *reinterpret_cast<const uint4*>(p) : load8_bits(p, min(8, K - k));
                }
            }
            const int byte = slice * (WO_BK / 2) + 16 * (tid & 3);
            b_next = b_src && byte < row_bytes ? load16_bytes(b_src + byte, row_bytes - byte, b_vec) : make_uint4(0u, 0u, 0u, 0u);
        },
        [&] {
#pragma unroll
            for (int i = 0; i < 8; ++i)
                if ((tid >> 4) + 8 * i < 16 * m_tiles) a_tile[((tid >> 4) + 8 * i) * WO_A_ROW_UINT4 + (tid & 15)] = a_next[i];
            b_tile[(tid >> 2) * WO_B_ROW_UINT4 + (tid & 3)] = b_next;
        },
        [&](int slice) {
            const uint4* b_row = b_tile + (warp * 8 + g) * WO_B_ROW_UINT4;
            const uint4 q0 = b_row[0], q1 = b_row[1], q2 = b_row[2], q3 = b_row[3];
            const unsigned packed[16] = {q0.x, q0.y, q0.z, q0.w, q1.x, q1.y, q1.z, q1.w, q2.x, q2.y, q2.z, q2.w, q3.x, q3.y, q3.z, q3.w};
#pragma unroll
            for (int step = 0; step < WO_BK / 16; ++step) {
                const int k = slice * WO_BK + 16 * step;
                if (k >= K) break;  // block-uniform
                const float param = b_col < N ? w.param(b_col, k) : 0.0f;
                const unsigned lo = (packed[2 * step] >> (8 * t)) & 0xFFu, hi = (packed[2 * step + 1] >> (8 * t)) & 0xFFu;
                const unsigned bf[2] = {pack_pair<T>(w.code(lo & 0xFu, param), w.code(lo >> 4, param)),
                                        pack_pair<T>(w.code(hi & 0xFu, param), w.code(hi >> 4, param))};
#pragma unroll
                for (int mi = 0; mi < 4; ++mi) {
                    if (mi >= m_tiles) break;  // block-uniform
                    const int row = mi * 16 + g, word = step * 8 + t;
                    const unsigned af[4] = {a_words[row * WO_A_ROW_WORDS + word], a_words[(row + 8) * WO_A_ROW_WORDS + word],
                                            a_words[row * WO_A_ROW_WORDS + word + 4], a_words[(row + 8) * WO_A_ROW_WORDS + word + 4]};
                    Mma<T>::run(part[mi], af, bf, part[mi]);
                }
                if (((k + 16) & w.group_mask()) == 0 || k + 16 >= K) {  // the scale group ends: promote
                    const float s0 = c_col < N ? w.group_scale(c_col, k) : 0.0f, s1 = c_col + 1 < N ? w.group_scale(c_col + 1, k) : 0.0f;
#pragma unroll
                    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
                        for (int r = 0; r < 4; ++r) {
                            acc[mi][r] += part[mi][r] * (r & 1 ? s1 : s0);
                            part[mi][r] = 0.0f;
                        }
                }
            }
        });

#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int row = mi * 16 + g + 8 * (r >> 1), col = c_col + (r & 1);
            if (row < rows && col < N) out[(long long)(m0 + row) * N + col] = from_float<T>(acc[mi][r]);
        }
}

template <typename T>
__global__ void __launch_bounds__(MMA_THREADS)
w4a16_gemm_mma(const T* __restrict__ a, const unsigned char* __restrict__ b_packed, const float* __restrict__ scales,
               const unsigned char* __restrict__ zeros, T* __restrict__ out, int M, int N, int K, int group_size) {
    weight_only_mma(a, Int4Weights{b_packed, scales, zeros, K, group_size, K / group_size}, out, M, N, K);
}

template <typename T>
__global__ void __launch_bounds__(MMA_THREADS)
fp4_gemm_mma(const T* __restrict__ a, const unsigned char* __restrict__ b_packed, const unsigned char* __restrict__ b_scales,
             const float* __restrict__ tensor_scale, T* __restrict__ out, int M, int N, int K, int fmt) {
    weight_only_mma(a, Fp4Weights{b_packed, b_scales, tensor_scale, K, fmt, cdiv(K, fmt == HAL_FMT_NVFP4 ? 16 : 32)}, out, M, N, K);
}
