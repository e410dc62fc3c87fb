// grouped_gemm_mma<T>: the grouped GEMM of moe.cu (grouped_gemm_simt) on NVIDIA's tensor cores,
// mma.sync.m16n8k16 (f16 / bf16, sm_80+). The hardware changes the algorithm: warp-level 16 x 8 x 16
// fragments with their fixed lane layouts (docs/hardware.md) decide the shared-memory layout and the
// work split, 4 warps of 32 lanes per block instead of 256 SIMT threads.
#include "hal_gpu.h"
#include "grouped_tile.h"

// 128 threads = 4 warps as 2 x 2 over the 64 x 64 tile, 32 x 32 each = 2 (m) x 4 (n) mma tiles
// of 16 x 8. w rows are K-contiguous, which is the "col" B operand of mma .row.col as is: a B
// register (k 2t, 2t + 1 of weight row g) is one 32-bit word of the [row][k] tile, exactly like an
// A register. So both tiles share one layout, [64 rows][32 k] padded to 40 halves (20 words): the
// fragment loads of lane (g, t) hit word 20 g + t, 32 distinct banks. Register prefetch of the
// next 32-k slice: per operand 256 chunks of 8 halves, 2 per thread (4 lanes per 64-byte row run).

#define GROUP_MMA_THREADS 128
#define GROUP_MMA_BK 32
#define GROUP_MMA_ROW_UINT4 5
#define GROUP_MMA_ROW_WORDS 20

template <typename T>
__global__ void __launch_bounds__(GROUP_MMA_THREADS)
grouped_gemm_mma(const T* __restrict__ x, const T* __restrict__ w, const int* __restrict__ expert_rows, T* __restrict__ out,
                 int R, int N, int K, int experts, int rows_per_expert, int activation, int gated) {
    __shared__ uint4 a_tile[GROUP_BM * GROUP_MMA_ROW_UINT4];
    __shared__ uint4 b_tile[GROUP_BN * GROUP_MMA_ROW_UINT4];
    __shared__ RowTile shared_tile;
    const int n0 = blockIdx.y * GROUP_BN_OUT(gated);
    const RowTile tile = expert_row_tile<GROUP_BM>(expert_rows, experts, R, rows_per_expert, &shared_tile);
    if (tile.rows <= 0) return;  // block-uniform
    if (tile.expert < 0) {
        zero_rows(out, tile, n0, GROUP_BN_OUT(gated), N);
        return;
    }
    const unsigned* a_words = reinterpret_cast<const unsigned*>(a_tile);
    const unsigned* b_words = reinterpret_cast<const unsigned*>(b_tile);
    const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;  // mma layouts are defined for 32 lanes
    const int g = lane >> 2, t = lane & 3;
    const int warp_row = (warp >> 1) * 32, warp_col = (warp & 1) * 32;

    // Chunk q = tid + 128 i is (row q / 4, k 8 (q % 4)); resolve this thread's two rows once.
    const unsigned short* x_bits = reinterpret_cast<const unsigned short*>(x);
    const unsigned short* w_bits = reinterpret_cast<const unsigned short*>(w) + (long long)tile.expert * (gated ? 2 * N : N) * K;
    const unsigned short* a_src[2];
    const unsigned short* b_src[2];
    for (int i = 0; i < 2; ++i) {
        const int row = (tid + i * GROUP_MMA_THREADS) >> 2, wr = weight_row(row, n0, N, gated);
        a_src[i] = row < tile.rows ? x_bits + (long long)(tile.row0 + row) * K : nullptr;
        b_src[i] = wr >= 0 ? w_bits + (long long)wr * K : nullptr;
    }
    const int k_chunk = 8 * (tid & 3);
    // 16-byte loads need every row 16-byte aligned: aligned bases and K a multiple of 8.
    const bool a_vec = K % 8 == 0 && reinterpret_cast<unsigned long long>(x) % 16 == 0;
    const bool b_vec = K % 8 == 0 && reinterpret_cast<unsigned long long>(w) % 16 == 0;

    float acc[2][4][4];
    for (int mi = 0; mi < 2; ++mi)
        for (int ni = 0; ni < 4; ++ni)
            for (int r = 0; r < 4; ++r) acc[mi][ni][r] = 0.0f;

    uint4 a_next[2], b_next[2];
    prefetch_main_loop(
        (K + GROUP_MMA_BK - 1) / GROUP_MMA_BK,
        [&](int slice) {  // the next slice is in flight while this one is multiplied
            const int k = slice * GROUP_MMA_BK + k_chunk;
            for (int i = 0; i < 2; ++i) {
                a_next[i] = load_row_chunk(a_src[i], k, K, a_vec);
                b_next[i] = load_row_chunk(b_src[i], k, K, b_vec);
            }
        },
        [&] {
            for (int i = 0; i < 2; ++i) {
                const int q = tid + i * GROUP_MMA_THREADS;
                a_tile[(q >> 2) * GROUP_MMA_ROW_UINT4 + (q & 3)] = a_next[i];
                b_tile[(q >> 2) * GROUP_MMA_ROW_UINT4 + (q & 3)] = b_next[i];
            }
        },
        [&](int) {
            for (int ks = 0; ks < GROUP_MMA_BK / 16; ++ks) {
                const int word = ks * 8 + t;
                // A: (row g, k 2t..), (row g + 8, same), (row g, k + 8), (row g + 8, k + 8).
                unsigned af[2][4];
                for (int mi = 0; mi < 2; ++mi) {
                    const int row = warp_row + mi * 16 + g;
                    af[mi][0] = a_words[row * GROUP_MMA_ROW_WORDS + word];
                    af[mi][1] = a_words[(row + 8) * GROUP_MMA_ROW_WORDS + word];
                    af[mi][2] = a_words[row * GROUP_MMA_ROW_WORDS + word + 4];
                    af[mi][3] = a_words[(row + 8) * GROUP_MMA_ROW_WORDS + word + 4];
                }
                // B ("col"): (k 2t, 2t + 1 of weight row g), (k 2t + 8, 2t + 9): one word each.
                unsigned bf[4][2];
                for (int ni = 0; ni < 4; ++ni) {
                    const int col = warp_col + ni * 8 + g;
                    bf[ni][0] = b_words[col * GROUP_MMA_ROW_WORDS + word];
                    bf[ni][1] = b_words[col * GROUP_MMA_ROW_WORDS + word + 4];
                }
                for (int mi = 0; mi < 2; ++mi)
                    for (int ni = 0; ni < 4; ++ni) Mma<T>::run(acc[mi][ni], af[mi], bf[ni], acc[mi][ni]);
            }
        });

    // C fragment: elements (2h, 2h + 1) of tile (mi, ni) are row g + 8h, positions 2t, 2t + 1: a
    // pair. Fully unrolled so that acc is never indexed at run time (which would spill it).
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int row = warp_row + mi * 16 + g + 8 * h;
            if (row >= tile.rows) continue;
            T* out_row = out + (long long)(tile.row0 + row) * N;
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) store_pair(out_row, N, n0, warp_col + ni * 8 + 2 * t, acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1], activation, gated);
        }
}
