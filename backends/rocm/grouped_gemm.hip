// grouped_gemm_mfma<T>: the grouped GEMM of moe.cu (grouped_gemm_simt) on AMD's matrix cores,
// v_mfma_f32_32x32x8 (f16 / bf16, gfx90a / gfx94x). The hardware changes the algorithm: wave64
// 32 x 32 x 8 MFMA fragments with their fixed lane layouts (docs/hardware.md) decide the LDS layout
// and the work split (4 waves, one 32 x 32 accumulator each, in AGPRs on gfx90a), and the gated
// epilogue pairs lanes l and l ^ 1 with one shuffle.
#include "hal_gpu.h"
#include "grouped_tile.h"

// 256 threads = 4 waves of 64 (MFMA exists only on wave64 CDNA, so 64 is a constant here); wave w
// computes rows 32 (w / 2) .. +31 x positions 32 (w % 2) .. +31 with one 32x32 fp32 accumulator
// (16 per lane: AGPRs on gfx90a, the unified file on gfx94x). Per K slice of 32 each thread stages
// one 8-element chunk of x and one of w (a row's 4 chunks are 64 contiguous bytes, one
// global_load_dwordx4 per lane when aligned). LDS rows are 32 + 4 halves = 72 B: the ds_read_b64
// fragment reads of 16 consecutive rows start on 16 distinct even banks (conflict-free), and
// the 16-byte chunk stores are two 8-byte-aligned ds_write_b64.

#define GROUP_MFMA_THREADS 256
#define GROUP_MFMA_BK 32
#define GROUP_MFMA_ROW_UINT2 9  // 72 bytes per LDS row

template <typename T>
__global__ __launch_bounds__(GROUP_MFMA_THREADS) void grouped_gemm_mfma(const T* __restrict__ x, const T* __restrict__ w, const int* __restrict__ expert_rows,
                                                                        T* __restrict__ out, int R, int N, int K, int experts, int rows_per_expert, int activation,
                                                                        int gated) {
    __shared__ uint2 As[GROUP_BM * GROUP_MFMA_ROW_UINT2];  // [row][k], 4608 B
    __shared__ uint2 Bs[GROUP_BN * GROUP_MFMA_ROW_UINT2];  // [weight row][k], 4608 B
    __shared__ RowTile lds_tile;
    const int n0 = blockIdx.y * GROUP_BN_OUT(gated);
    const RowTile tile = expert_row_tile<GROUP_BM>(expert_rows, experts, R, rows_per_expert, &lds_tile);
    if (tile.rows <= 0) return;  // block-uniform
    if (tile.expert < 0) {
        zero_rows(out, tile, n0, GROUP_BN_OUT(gated), N);
        return;
    }
    const int tid = threadIdx.x, lane = tid % 64, wave = tid / 64;
    const int wm = (wave / 2) * 32, wn = (wave % 2) * 32;

    // Staging: row tid / 4, k chunk 8 (tid % 4), for x and for w.
    const int s_row = tid / 4, s_chunk = tid % 4;
    const int wr = weight_row(s_row, n0, N, gated);
    const unsigned short* a_src = s_row < tile.rows ? reinterpret_cast<const unsigned short*>(x) + (long long)(tile.row0 + s_row) * K : nullptr;
    const unsigned short* b_src =
        wr >= 0 ? reinterpret_cast<const unsigned short*>(w) + ((long long)tile.expert * (gated ? 2 * N : N) + wr) * K : nullptr;
    const bool a_vec = K % 8 == 0 && (reinterpret_cast<unsigned long long>(x) & 15) == 0;
    const bool b_vec = K % 8 == 0 && (reinterpret_cast<unsigned long long>(w) & 15) == 0;
    uint4 ra = load_row_chunk(a_src, 8 * s_chunk, K, a_vec), rb = load_row_chunk(b_src, 8 * s_chunk, K, b_vec);

    float acc[16];
#pragma unroll
    for (int r = 0; r < 16; ++r) acc[r] = 0.0f;

    // The register-prefetch main loop of hal_gpu.h (prefetch_main_loop), written out: through its
    // lambdas clang 15 keeps the 16 accumulators in scratch memory instead of AGPRs.
    for (int k0 = 0; k0 < K; k0 += GROUP_MFMA_BK) {
        uint2* a_dst = As + s_row * GROUP_MFMA_ROW_UINT2 + 2 * s_chunk;
        uint2* b_dst = Bs + s_row * GROUP_MFMA_ROW_UINT2 + 2 * s_chunk;
        a_dst[0] = make_uint2(ra.x, ra.y), a_dst[1] = make_uint2(ra.z, ra.w);
        b_dst[0] = make_uint2(rb.x, rb.y), b_dst[1] = make_uint2(rb.z, rb.w);
        __syncthreads();
        if (k0 + GROUP_MFMA_BK < K) {  // the next slice's loads overlap the MFMAs
            ra = load_row_chunk(a_src, k0 + GROUP_MFMA_BK + 8 * s_chunk, K, a_vec);
            rb = load_row_chunk(b_src, k0 + GROUP_MFMA_BK + 8 * s_chunk, K, b_vec);
        }
#pragma unroll
        for (int kk = 0; kk < GROUP_MFMA_BK; kk += 8) {
            // A: row = lane % 32, k = 4 (lane / 32) + r; B: position = lane % 32, same k.
            const int k4 = (kk + 4 * (lane / 32)) / 4;
            const uint2 av = As[(wm + lane % 32) * GROUP_MFMA_ROW_UINT2 + k4];
            const uint2 bv = Bs[(wn + lane % 32) * GROUP_MFMA_ROW_UINT2 + k4];
            T af[4], bf[4];
            __builtin_memcpy(af, &av, sizeof(av));
            __builtin_memcpy(bf, &bv, sizeof(bv));
            mfma_32x32x8(acc, af, bf, acc);
        }
        __syncthreads();
    }

    // D: position = lane % 32, row = 8 (r / 4) + 4 (lane / 32) + r % 4.
    const int p = wn + lane % 32;
    if (!gated) {
        if (n0 + p >= N) return;
#pragma unroll
        for (int r = 0; r < 16; ++r) {
            const int row = wm + 8 * (r / 4) + 4 * (lane / 32) + r % 4;
            if (row < tile.rows) out[(long long)(tile.row0 + row) * N + n0 + p] = from_float<T>(activate(acc[r], activation));
        }
        return;
    }
    // Gated: the gate (even p) and up (odd p) of a column sit in lanes l and l ^ 1. One shuffle
    // per pair of registers: the even lane finishes rows r < 8 with the partner's acc[r], the odd
    // lane rows r >= 8 with the partner's acc[r] (8 ds_swizzle-class moves instead of 16).
    const bool odd = lane & 1;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        const float mine = odd ? acc[i + 8] : acc[i];
        const float other = warp_shfl_xor(odd ? acc[i] : acc[i + 8], 1);
        const int r = odd ? i + 8 : i;
        const int row = wm + 8 * (r / 4) + 4 * (lane / 32) + r % 4;
        if (row < tile.rows) store_pair(out + (long long)(tile.row0 + row) * N, N, n0, p & ~1, odd ? other : mine, odd ? mine : other, activation, 1);
    }
}
