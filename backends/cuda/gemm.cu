// Vendor file: NVIDIA's tensor cores change the algorithm (gemm_mma: warp-level mma.sync.m16n8k16
// fragments and their lane layouts set the shared-memory layout and a 4-warp, 128-thread block).
// gemm with a fused epilogue: out = act(alpha * (a @ b) + bias) + beta * c.
//
// a [M, K] and b [K, N] are row-major T; c and out are [M, N] in the output type To; bias is fp32
// [N] (nullptr when absent, as is c). Accumulation is fp32; the epilogue runs on the fp32
// accumulator and rounds once, to To. Every block computes a 64 x 64 tile of out
// (grid = (ceil(N/64), ceil(M/64))); edges are bounds-checked, so any M, N, K works (K = 0 gives
// act(bias) + beta * c).
//
// Two variants:
//   gemm_simt<T, To>  every type and architecture: 256 threads, fp32 FMA, 4 x 4 outputs per thread.
//   gemm_mma<T, To>   T = __half / __nv_bfloat16 on sm_80+: 128 threads = 4 warps of 32 x 32, each
//                     warp issuing mma.sync.m16n8k16 (2 x 4 tiles of 16 x 8 per 16-wide k step).
#include "hal_gpu.h"

#define GEMM_TILE 64

// The epilogue of one output element, in fp32.
template <typename To>
__device__ __forceinline__ void gemm_store(const float* __restrict__ bias, const To* __restrict__ c, To* __restrict__ out, int M, int N,
                                           int row, int col, float acc, float alpha, float beta, int activation) {
    if (row >= M || col >= N) return;
    float v = alpha * acc;
    if (bias) v += bias[col];
    v = activate(v, activation);
    const long long idx = (long long)row * N + col;
    if (c) v += beta * to_float(c[idx]);
    out[idx] = from_float<To>(v);
}

// ================================================================ SIMT

#define SIMT_THREADS 256
#define SIMT_BK 16  // k depth of a shared-memory tile: 2 x 4 KB of fp32 per stage
// The a tile is stored transposed, [k][m], so that a thread's 4 rows are one 16-byte float4 load.
// Its row stride is padded from 64 to 68 floats: still a multiple of 4 (float4 alignment), and the
// transposing store (lanes vary in k) then spreads over banks with a 2-way conflict at worst
// instead of 16-way.
#define SIMT_A_STRIDE 68

// Thread (tx, ty) = (tid % 16, tid / 16) owns rows 4*ty..4*ty+3 and columns 4*tx..4*tx+3 of the tile.
// Per k it reads one float4 of a (the same for the 16 lanes of a half warp: a broadcast) and
// one float4 of b (16 distinct, contiguous float4s: conflict-free), then issues 16 FMAs from
// registers. The accumulators (16), both fragments (8) and the prefetch registers (8) are far
// below the 255-register budget, so there is room for 4 blocks per SM at 256 threads.
template <typename T, typename To>
__global__ void __launch_bounds__(SIMT_THREADS)
gemm_simt(const T* __restrict__ a, const T* __restrict__ b, const float* __restrict__ bias, const To* __restrict__ c, To* __restrict__ out,
          int M, int N, int K, float alpha, float beta, int activation) {
    // float4 arrays: guarantees the 16-byte alignment of the vector loads below.
    __shared__ float4 a_tile[SIMT_BK][SIMT_A_STRIDE / 4];
    __shared__ float4 b_tile[SIMT_BK][GEMM_TILE / 4];
    float* a_flat = reinterpret_cast<float*>(&a_tile[0][0]);
    float* b_flat = reinterpret_cast<float*>(&b_tile[0][0]);

    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int m0 = blockIdx.y * GEMM_TILE, n0 = blockIdx.x * GEMM_TILE;

    float acc[4][4];
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

    // Each thread stages 4 elements of a and 4 of b per tile, widened to fp32 in registers while
    // the previous tile is being multiplied (register prefetch: one tile of shared memory suffices).
    // a: element e = tid + 256 r -> (m, k) = (e / 16, e % 16): 16 lanes read 16 consecutive k of a row.
    // b: element e -> (k, n) = (e / 64, e % 64): a warp reads 32 consecutive n of a row.
    float a_next[4], b_next[4];
    const int tiles = (K + SIMT_BK - 1) / SIMT_BK;
    prefetch_main_loop(
        tiles,
        [&](int tile) {
            const int k0 = tile * SIMT_BK;
            for (int r = 0; r < 4; ++r) {
                const int e = tid + r * SIMT_THREADS;
                const int am = m0 + e / SIMT_BK, ak = k0 + e % SIMT_BK;
                a_next[r] = (am < M && ak < K) ? to_float(a[(long long)am * K + ak]) : 0.0f;
                const int bk = k0 + e / GEMM_TILE, bn = n0 + e % GEMM_TILE;
                b_next[r] = (bk < K && bn < N) ? to_float(b[(long long)bk * N + bn]) : 0.0f;
            }
        },
        [&] {
            for (int r = 0; r < 4; ++r) {
                const int e = tid + r * SIMT_THREADS;
                a_flat[(e % SIMT_BK) * SIMT_A_STRIDE + e / SIMT_BK] = a_next[r];
                b_flat[e] = b_next[r];
            }
        },
        [&](int) {
            for (int k = 0; k < SIMT_BK; ++k) {
                const float4 av = a_tile[k][ty], bv = b_tile[k][tx];
                const float ar[4] = {av.x, av.y, av.z, av.w}, br[4] = {bv.x, bv.y, bv.z, bv.w};
                for (int i = 0; i < 4; ++i)
                    for (int j = 0; j < 4; ++j) acc[i][j] += ar[i] * br[j];
            }
        });

    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j)
            gemm_store(bias, c, out, M, N, m0 + 4 * ty + i, n0 + 4 * tx + j, acc[i][j], alpha, beta, activation);
}

// ================================================================ tensor cores (mma.sync)

#define MMA_THREADS 128
#define MMA_BK 32  // k depth of a shared-memory tile: two m16n8k16 steps
// Shared memory holds raw 16-bit patterns (f16 or bf16) in uint4 arrays: 16-byte aligned for the
// vector stores, and read back as 32-bit words (a) or 16-bit halves (b).
//
// a tile [64 rows][32 k], row padded 32 -> 40 halves (80 bytes = 5 uint4 = 20 words). An A
// fragment load has lane (g, t) read word 20*g + t (+ constant): with a 20-word stride the 8 rows
// x 4 words land in 32 distinct banks (an unpadded 16-word stride would be a 4-way conflict).
#define MMA_A_ROW_UINT4 5
#define MMA_A_ROW_WORDS 20
// b tile [32 k][64 n], row padded 64 -> 72 halves (144 bytes = 9 uint4 = 36 words). The B
// fragment wants pairs along k for one n, which are not adjacent in a row-major tile (there is
// no ldmatrix.trans in the contract), so each register is built from two 16-bit loads. Lane
// (g, t) reads rows 2t, 2t + 1 (+8) at column g: with a 36-word stride rows 0, 2, 4, 6 start in
// banks 0, 8, 16, 24 and the 8 columns cover 4 words each, so the warp is conflict-free.
#define MMA_B_ROW_UINT4 9
#define MMA_B_ROW_HALVES 72

// Warps are 2 x 2 over the 64 x 64 tile, 32 x 32 each = 2 (m) x 4 (n) mma tiles of 16 x 8:
// 32 fp32 accumulators per lane. With the fragments (8 + 8 registers) and the prefetched global
// data (4 x uint4 = 16 registers) that stays around 100 registers: spill-free at 128 threads.
template <typename T, typename To>
__global__ void __launch_bounds__(MMA_THREADS)
gemm_mma(const T* __restrict__ a, const T* __restrict__ b, const float* __restrict__ bias, const To* __restrict__ c, To* __restrict__ out,
         int M, int N, int K, float alpha, float beta, int activation) {
    __shared__ uint4 a_tile[GEMM_TILE * MMA_A_ROW_UINT4];
    __shared__ uint4 b_tile[MMA_BK * MMA_B_ROW_UINT4];
    const unsigned* a_words = reinterpret_cast<const unsigned*>(a_tile);
    const unsigned short* b_halves = reinterpret_cast<const unsigned short*>(b_tile);
    // The inputs as raw 16-bit patterns: they are only moved until the mma reads them.
    const unsigned short* a_bits = reinterpret_cast<const unsigned short*>(a);
    const unsigned short* b_bits = reinterpret_cast<const unsigned short*>(b);

    const int tid = threadIdx.x;
    const int lane = tid % 32, warp = tid / 32;  // the mma fragment layouts are defined for 32-lane warps
    const int g = lane >> 2, t = lane & 3;
    const int warp_row = (warp >> 1) * 32, warp_col = (warp & 1) * 32;
    const int m0 = blockIdx.y * GEMM_TILE, n0 = blockIdx.x * GEMM_TILE;

    // 16-byte global loads need 16-byte aligned rows: base pointer aligned and row length a
    // multiple of 8 elements. Otherwise (and for the partial chunk at a row's end) scalar loads.
    const bool a_vector = K % 8 == 0 && reinterpret_cast<unsigned long long>(a) % 16 == 0;
    const bool b_vector = N % 8 == 0 && reinterpret_cast<unsigned long long>(b) % 16 == 0;

    float acc[2][4][4];
    for (int mi = 0; mi < 2; ++mi)
        for (int ni = 0; ni < 4; ++ni)
            for (int r = 0; r < 4; ++r) acc[mi][ni][r] = 0.0f;

    // Per tile each thread moves 2 chunks of 8 elements of a and 2 of b.
    // a chunk q = tid + 128 i -> row q / 4, k chunk q % 4: 4 lanes read 64 contiguous bytes of a row.
    // b chunk q -> k row q / 8, n chunk q % 8: 8 lanes read 128 contiguous bytes; their stores
    // fill one 36-word row segment, conflict-free (the a stores are 2-way at worst).
    uint4 a_next[2], b_next[2];
    const int tiles = (K + MMA_BK - 1) / MMA_BK;
    prefetch_main_loop(
        tiles,
        [&](int tile) {  // prefetch the next tile into registers while this one is multiplied
            const int k0 = tile * MMA_BK;
            for (int i = 0; i < 2; ++i) {
                const int q = tid + i * MMA_THREADS;
                const int am = m0 + (q >> 2), ak = k0 + 8 * (q & 3);
                a_next[i] = make_uint4(0u, 0u, 0u, 0u);
                if (am < M && ak < K) {
                    const unsigned short* p = a_bits + (long long)am * K + ak;
                    a_next[i] = a_vector ? *reinterpret_cast<const uint4*>(p) : load8_bits(p, min(8, K - ak));
                }
                const int bk = k0 + (q >> 3), bn = n0 + 8 * (q & 7);
                b_next[i] = make_uint4(0u, 0u, 0u, 0u);
                if (bk < K && bn < N) {
                    const unsigned short* p = b_bits + (long long)bk * N + bn;
                    b_next[i] = b_vector ? *reinterpret_cast<const uint4*>(p) : load8_bits(p, min(8, N - bn));
                }
            }
        },
        [&] {
            for (int i = 0; i < 2; ++i) {
                const int q = tid + i * MMA_THREADS;
                a_tile[(q >> 2) * MMA_A_ROW_UINT4 + (q & 3)] = a_next[i];
                b_tile[(q >> 3) * MMA_B_ROW_UINT4 + (q & 7)] = b_next[i];
            }
        },
        [&](int) {
            for (int ks = 0; ks < MMA_BK / 16; ++ks) {
                // A fragment (16 x 16, row-major): registers (row g, k 2t..2t+1), (row g+8, same k),
                // (row g, k + 8), (row g+8, k + 8); each register is one 32-bit word of the tile.
                unsigned af[2][4];
                for (int mi = 0; mi < 2; ++mi) {
                    const int row = warp_row + mi * 16 + g;
                    const int word = ks * 8 + t;
                    af[mi][0] = a_words[row * MMA_A_ROW_WORDS + word];
                    af[mi][1] = a_words[(row + 8) * MMA_A_ROW_WORDS + word];
                    af[mi][2] = a_words[row * MMA_A_ROW_WORDS + word + 4];
                    af[mi][3] = a_words[(row + 8) * MMA_A_ROW_WORDS + word + 4];
                }
                // B fragment (16 x 8, "col"): registers (k 2t, 2t+1 at column g), (k 2t+8, 2t+9);
                // the lower k in the low 16 bits.
                unsigned bf[4][2];
                for (int ni = 0; ni < 4; ++ni) {
                    const int col = warp_col + ni * 8 + g;
                    const int k = ks * 16 + 2 * t;
                    bf[ni][0] = (unsigned)b_halves[k * MMA_B_ROW_HALVES + col] | ((unsigned)b_halves[(k + 1) * MMA_B_ROW_HALVES + col] << 16);
                    bf[ni][1] = (unsigned)b_halves[(k + 8) * MMA_B_ROW_HALVES + col] | ((unsigned)b_halves[(k + 9) * MMA_B_ROW_HALVES + col] << 16);
                }
                for (int mi = 0; mi < 2; ++mi)
                    for (int ni = 0; ni < 4; ++ni) Mma<T>::run(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
            }
        });

    // C fragment: element r of tile (mi, ni) is (row g + 8 (r / 2), column 2t + r % 2).
    // Fully unrolled (the epilogue body is too large for the automatic unroller): a loop left
    // rolled would index acc at run time and move all 32 accumulators to local memory.
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
            for (int r = 0; r < 4; ++r)
                gemm_store(bias, c, out, M, N, m0 + warp_row + mi * 16 + g + 8 * (r >> 1), n0 + warp_col + ni * 8 + 2 * t + (r & 1),
                           acc[mi][ni][r], alpha, beta, activation);
}
