// Tiles of the grouped GEMMs (grouped_gemm_simt in moe.cu, grouped_gemm_mma / grouped_gemm_mfma in
// the vendors' grouped_gemm files): included after hal_gpu.h.
//
// out[r] = x[r] @ w[e]^T for the rows r of expert e: offsets[e] <= r < offsets[e + 1] (grouped_gemm),
// or e M <= r < e M + clamp(masked_m[e], 0, M) of x [E, M, K] (grouped_gemm_masked, rows_per_expert
// = M); w is [E, N, K] (gated: [E, 2N, K]), K-contiguous like x, so both operands are "rows of K"
// and load the same way.
//
// Work split (expert_row_tile in hal_gpu.h): an expert's rows are cut into 64-row tiles. Offsets:
// numbered in expert order, grid.x an upper bound on their number, ceil(R / 64) + E + 1; every
// block finds its (expert, rows) by a scan of the offsets, the blocks past the last expert tile
// zero the rows outside [offsets[0], offsets[E]) instead, the rest exit. Masked: grid.x = 2 E
// ceil(M / 64), a tile's expert and rows by index arithmetic, the second half zeroing the rows past
// the counts. grid.y walks the output columns, so consecutive blocks (same column tile, next rows)
// reuse a weight tile from L2.
//
// A block computes 64 rows x 64 weight rows. Plain: weight row n0 + p is output column n0 + p.
// Gated (act(gate) * up): position p is the gate row (p even) or the up row (p odd) of output column
// n0 + p / 2, so every accumulator pair (p, p + 1) a thread holds is one gate / up pair, combined
// in registers; such a block covers 32 output columns.

#pragma once

#define GROUP_BM 64     // x rows per tile
#define GROUP_BN 64     // weight rows per tile
#define GROUP_BN_OUT(gated) block_columns(GROUP_BN, gated)
