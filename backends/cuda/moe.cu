// Mixture of experts: routing, the expert-sorted token layout, gather / combine and the grouped
// GEMM over that layout. ops/moe.py is the executable semantics; docs/gpu-kernels.md the ABI.
//
//   moe_route<T>            one warp per token: scores, optional grouped selection, k arg-max rounds
//   moe_align_count<I>      histogram of expert ids (shared-memory bins, then global atomics)
//   moe_align_scatter<I>    one block per expert: offsets by a scan of the counts, then a stable
//                           compaction of its flat indices; one more block for the tail
//   moe_permute<T>          row gather x[sorted_ids / k] (zeros for padding)
//   moe_unpermute_index<I>  inverse map flat index -> row of y (I: the type of sorted_ids)
//   moe_unpermute<T>        per token: sum_j w[t, j] * y[row of (t, j)], fp32, j in order
//   grouped_gemm_simt<T>    out[r] = x[r] @ w[e]^T per expert segment, fp32 FMA
//   grouped_gemm_mma<T>     the same on mma.sync.m16n8k16 (f16 / bf16, sm_80+)
//
// Nothing here reads device data on the host: every size that depends on the routing (segment
// lengths, the padded total, which tile a block works on) is found by the kernels themselves.
#include "common.cuh"

#define FULL_WARP 0xffffffffu
#define NO_INDEX 0x7fffffff  // "no candidate" in arg-max pairs: ranks after every real index

// ================================================================ block-wide prefix sums

// Inclusive prefix sum over the warp, in lane order (Hillis-Steele with shuffles: log2(32) steps;
// lanes below the distance keep their value).
__device__ __forceinline__ int warp_inclusive_scan(int v) {
    const int lane = threadIdx.x % warpSize;
    for (int d = 1; d < warpSize; d <<= 1) {
        const int below = __shfl_sync(FULL_WARP, v, lane - d);
        if (lane >= d) v += below;
    }
    return v;
}

// Exclusive prefix sum of v over the block in thread order; `total` receives the block's sum.
// `scratch` is __shared__ int[HAL_MAX_WARPS]. Every thread must call it (it has barriers); the
// leading barrier makes back-to-back calls with the same scratch safe.
__device__ __forceinline__ int block_exclusive_scan(int v, int* scratch, int& total) {
    const int lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize;
    const int inclusive = warp_inclusive_scan(v);
    __syncthreads();
    if (lane == warpSize - 1) scratch[warp] = inclusive;
    __syncthreads();
    // Every warp scans the (at most 32) warp totals itself: no broadcast slot, no third barrier.
    const int warps_inclusive = warp_inclusive_scan(lane < warps_per_block() ? scratch[lane] : 0);
    total = __shfl_sync(FULL_WARP, warps_inclusive, warps_per_block() - 1);
    const int warps_before = __shfl_sync(FULL_WARP, warps_inclusive, warp - 1);
    return (warp > 0 ? warps_before : 0) + inclusive - v;
}

// ================================================================ moe_route
// A token's E scores live in shared memory (lane l owns entries l, l + 32, ...: conflict-free),
// and top-k is k rounds of a warp arg-max over (value, index) pairs, each round taking the best
// pair that ranks after the previous winner. Nothing is marked as taken, so the selection is
// stateless and ties go to the lower index exactly as the reference orders them. Excluded
// experts (groups not kept) hold NaN, which never ranks. Per token: E fp32 scores, E selection
// values and n_group group scores (the glue sizes the dynamic shared memory).

#define ROUTE_TOKENS 4  // tokens per block, one warp each: 128 threads
#define ROUTE_SIGMOID 1

// Whether (v, i) ranks before (w, j): the higher value, then the lower index. False for NaN v.
__device__ __forceinline__ bool ranks_before(float v, int i, float w, int j) { return v > w || (v == w && i < j); }

// Among values[0, n), the best pair ranking after (prev_v, prev_i), over the whole warp. Returns
// false (and leaves prev alone) when there is none; otherwise every lane gets it in prev.
__device__ __forceinline__ bool warp_next(const float* values, int n, float& prev_v, int& prev_i) {
    float v = -INFINITY;
    int i = NO_INDEX;
    for (int e = threadIdx.x % warpSize; e < n; e += warpSize) {
        const float x = values[e];
        if (ranks_before(prev_v, prev_i, x, e) && ranks_before(x, e, v, i)) v = x, i = e;
    }
    for (int offset = warpSize / 2; offset > 0; offset >>= 1) {
        const float other_v = __shfl_xor_sync(FULL_WARP, v, offset);
        const int other_i = __shfl_xor_sync(FULL_WARP, i, offset);
        if (ranks_before(other_v, other_i, v, i)) v = other_v, i = other_i;
    }
    if (i == NO_INDEX) return false;
    prev_v = v, prev_i = i;
    return true;
}

template <typename T>
__global__ void __launch_bounds__(ROUTE_TOKENS * 32)
moe_route(const T* __restrict__ logits, const float* __restrict__ bias, float* __restrict__ topk_weights, int* __restrict__ topk_ids,
          int tokens, int experts, int k, int scoring, int n_group, int topk_group, int renormalize, float scaling) {
    HAL_DYNAMIC_SHARED(float, route_shared);
    const int lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize;
    const int t = blockIdx.x * ROUTE_TOKENS + warp;
    if (t >= tokens) return;  // whole warps; only warp-level syncs below
    float* score = route_shared + warp * (2 * experts + n_group);
    float* select = score + experts;  // score + bias: what ranks
    float* group_score = select + experts;
    const T* row = logits + (long long)t * experts;

    // Scores in fp32. softmax: max, exp and sum, normalize; each lane touches only its own entries.
    if (scoring == ROUTE_SIGMOID) {
        for (int e = lane; e < experts; e += warpSize) score[e] = 1.0f / (1.0f + expf(-to_float(row[e])));
    } else {
        float m = -INFINITY;
        for (int e = lane; e < experts; e += warpSize) m = fmaxf(m, score[e] = to_float(row[e]));
        m = warp_max(m);
        float sum = 0.0f;
        for (int e = lane; e < experts; e += warpSize) sum += score[e] = expf(score[e] - m);
        sum = warp_sum(sum);
        for (int e = lane; e < experts; e += warpSize) score[e] = score[e] / sum;
    }
    for (int e = lane; e < experts; e += warpSize) select[e] = bias ? score[e] + bias[e] : score[e];
    __syncwarp(FULL_WARP);  // from here on lanes read each other's entries

    if (n_group > 0) {
        // Group score = sum of the group's two largest values: one lane per group (DeepSeek-V3:
        // 8 groups of 32, so this is a short serial scan on 8 lanes).
        const int size = experts / n_group;
        for (int g = lane; g < n_group; g += warpSize) {
            float first = -INFINITY, second = -INFINITY;
            for (int e = g * size; e < (g + 1) * size; ++e) {
                const float v = select[e];
                if (v > first) second = first, first = v;
                else if (v > second) second = v;
            }
            group_score[g] = first + second;
        }
        __syncwarp(FULL_WARP);
        // The topk_group best groups: (kept_v, kept_i) ends as the last one kept, and a group is
        // kept iff it ranks at or before it. Experts of the other groups drop out as NaN.
        float kept_v = INFINITY;
        int kept_i = -1;
        for (int r = 0; r < topk_group; ++r) warp_next(group_score, n_group, kept_v, kept_i);
        for (int e = lane; e < experts; e += warpSize) {
            const int g = e / size;
            if (g != kept_i && !ranks_before(group_score[g], g, kept_v, kept_i)) select[e] = 0.0f * INFINITY;
        }
        // Each lane only masked its own entries, which are the ones it scans below.
    }

    // k arg-max rounds; round j is written by lane j % 32, which later rescales its own entries.
    float v = INFINITY, sum = 0.0f;
    int id = -1;
    const long long out0 = (long long)t * k;
    for (int j = 0; j < k; ++j) {
        const bool found = warp_next(select, experts, v, id);  // warp-uniform
        const float weight = found ? score[id] : 0.0f;
        sum += weight;
        if (lane == j % warpSize) {
            topk_ids[out0 + j] = found ? id : -1;
            topk_weights[out0 + j] = weight;
        }
    }
    for (int j = lane; j < k; j += warpSize)
        topk_weights[out0 + j] = (renormalize ? topk_weights[out0 + j] / sum : topk_weights[out0 + j]) * scaling;
}

// ================================================================ moe_align
// Deterministic by construction: counts come from atomics (a sum does not depend on the order),
// and the positions inside an expert's segment from a stable block-wide compaction in flat index
// order, never from the order atomics happen to run in.

#define ALIGN_COUNT_THREADS 256
#define ALIGN_THREADS 1024  // the compaction walks the ids in chunks of 1024

// counts[e] += number of ids equal to e (counts zeroed by the glue). Bins in shared memory
// (experts ints, dynamic), so a hot expert costs shared atomics, and one global atomic per
// expert and block.
template <typename I>
__global__ void __launch_bounds__(ALIGN_COUNT_THREADS)
moe_align_count(const I* __restrict__ topk_ids, int* __restrict__ counts, int n, int experts) {
    HAL_DYNAMIC_SHARED(int, bins);
    for (int e = threadIdx.x; e < experts; e += blockDim.x) bins[e] = 0;
    __syncthreads();
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const I id = topk_ids[i];
        if (id >= 0 && id < experts) atomicAdd(&bins[id], 1);  // other ids: experts on other ranks
    }
    __syncthreads();
    for (int e = threadIdx.x; e < experts; e += blockDim.x)
        if (bins[e]) atomicAdd(&counts[e], bins[e]);
}

// Block e < experts: the flat indices i with topk_ids[i] == e, ascending, at expert_offsets[e],
// then the sentinel n up to the padded end, and block_experts of its blocks. Block `experts`:
// expert_offsets, total, and the tail past the total (sentinels, block_experts -1). Every block
// first finds its segment by an exclusive scan of the padded counts: experts <= a few hundred is
// one chunk of 1024, cheaper than a separate single-block launch. An expert block then scans the
// ids chunk by chunk and stops once it has found its counts[e] (no tokens: no scan at all).
template <typename I>
__global__ void __launch_bounds__(ALIGN_THREADS)
moe_align_scatter(const I* __restrict__ topk_ids, const int* __restrict__ counts, int* __restrict__ sorted_ids, int* __restrict__ block_experts,
                  int* __restrict__ expert_offsets, int* __restrict__ total, int n, int experts, int block_m, int capacity) {
    __shared__ int scratch[HAL_MAX_WARPS];
    __shared__ int segment[2];
    const int e = blockIdx.x;
    const bool tail = e == experts;
    int carry = 0;
    for (int base = 0; base < experts; base += blockDim.x) {
        const int x = base + threadIdx.x;
        const int padded = x < experts ? (counts[x] + block_m - 1) / block_m * block_m : 0;
        int chunk;
        const int start = carry + block_exclusive_scan(padded, scratch, chunk);
        if (x < experts && x == e) segment[0] = start, segment[1] = start + padded;
        if (x < experts && tail) expert_offsets[x] = start;
        carry += chunk;
    }
    if (tail && threadIdx.x == 0) {
        expert_offsets[experts] = total[0] = carry;
        segment[0] = carry, segment[1] = capacity;
    }
    __syncthreads();
    const int start = segment[0], end = segment[1], count = tail ? 0 : counts[e];
    int found = 0;
    for (int base = 0; base < n && found < count; base += blockDim.x) {  // found, count: block-uniform
        const int i = base + threadIdx.x;
        const int hit = i < n && topk_ids[i] == (I)e;
        int chunk;
        const int before = block_exclusive_scan(hit, scratch, chunk);
        if (hit && start + found + before < end) sorted_ids[start + found + before] = i;
        found += chunk;
    }
    for (int i = start + found + threadIdx.x; i < end; i += blockDim.x) sorted_ids[i] = n;
    const int owner = tail ? -1 : e;
    for (int b = start / block_m + threadIdx.x; b < end / block_m; b += blockDim.x) block_experts[b] = owner;
}

// ================================================================ moe_permute / moe_unpermute

#define PERMUTE_THREADS 256

// out[r] = x[sorted_ids[r] / k] for 0 <= sorted_ids[r] < valid (= T * k), zeros otherwise. A pure
// copy of bits: 16 bytes per thread and step when the rows allow it.
template <typename T>
__global__ void __launch_bounds__(PERMUTE_THREADS)
moe_permute(const T* __restrict__ x, const int* __restrict__ sorted_ids, T* __restrict__ out, int rows, int hidden, int k, int valid) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const int id = sorted_ids[r];
    const T* src = id >= 0 && id < valid ? x + (long long)(id / k) * hidden : nullptr;
    T* dst = out + (long long)r * hidden;
    if (hidden * sizeof(T) % 16 == 0 && reinterpret_cast<unsigned long long>(x) % 16 == 0 && reinterpret_cast<unsigned long long>(out) % 16 == 0) {
        const int chunks = hidden * sizeof(T) / 16;
        for (int c = threadIdx.x; c < chunks; c += blockDim.x)
            reinterpret_cast<uint4*>(dst)[c] = src ? reinterpret_cast<const uint4*>(src)[c] : make_uint4(0u, 0u, 0u, 0u);
    } else {
        for (int h = threadIdx.x; h < hidden; h += blockDim.x) dst[h] = src ? src[h] : from_float<T>(0.0f);
    }
}

// row_of[f] = 1 + the row r with sorted_ids[r] == f; row_of was zeroed by the glue, so 0 means
// "in no row" (a skipped expert) and needs no separate fill pass.
template <typename I>
__global__ void __launch_bounds__(PERMUTE_THREADS)
moe_unpermute_index(const I* __restrict__ sorted_ids, int* __restrict__ row_of, int rows, int valid) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const I id = sorted_ids[r];
    if (id >= 0 && id < valid) row_of[id] = r + 1;
}

// Eight fp32 values rounded to T and stored at p (the first `valid` of them): 16-byte stores
// when `vec` (an aligned chunk, as chunks_aligned decides), else element by element.
__device__ __forceinline__ void store8(float* p, int valid, bool vec, const float v[8]) {
    if (vec && valid >= 8) {
        reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
        reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
    } else {
        for (int e = 0; e < 8; ++e)
            if (e < valid) p[e] = v[e];
    }
}
template <typename T>
__device__ __forceinline__ void store8(T* p, int valid, bool vec, const float v[8]) {
    if (vec && valid >= 8) {
        uint4 u;
        T* e = reinterpret_cast<T*>(&u);
        for (int i = 0; i < 8; ++i) e[i] = from_float<T>(v[i]);
        *reinterpret_cast<uint4*>(p) = u;
    } else {
        for (int e = 0; e < 8; ++e)
            if (e < valid) p[e] = from_float<T>(v[e]);
    }
}

// One block per token; a thread owns 8-column chunks and sums its k rows in j order in fp32.
template <typename T>
__global__ void __launch_bounds__(PERMUTE_THREADS)
moe_unpermute(const T* __restrict__ y, const int* __restrict__ row_of, const float* __restrict__ topk_weights, T* __restrict__ out,
              int tokens, int hidden, int k, int rows) {
    const int t = blockIdx.x;
    if (t >= tokens) return;
    const bool vec = chunks_aligned(y, hidden) && chunks_aligned(out, hidden);
    const int* slots = row_of + (long long)t * k;
    const float* weights = topk_weights + (long long)t * k;
    for (int c = 8 * threadIdx.x; c < hidden; c += 8 * blockDim.x) {
        const int valid = min(8, hidden - c);
        float acc[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
        for (int j = 0; j < k; ++j) {
            const int r = slots[j] - 1;
            if (r < 0 || r >= rows) continue;  // a skipped (token, slot) contributes 0
            float v[8];
            load8_float(y + (long long)r * hidden + c, valid, vec, 0, v);
            const float w = weights[j];
            for (int e = 0; e < 8; ++e) acc[e] += w * v[e];
        }
        store8(out + (long long)t * hidden + c, valid, vec, acc);
    }
}

// ================================================================ grouped GEMM
// out[r] = x[r] @ w[e]^T for offsets[e] <= r < offsets[e + 1]; w is [E, N, K] (gated: [E, 2N, K]),
// K-contiguous like x, so both operands are "rows of K" and load the same way.
//
// Work split (expert_row_tile in common.cuh): an expert's segment is cut into 64-row tiles,
// numbered in expert order, and grid.x is an upper bound on their number, ceil(R / 64) + E + 1.
// Every block finds its (expert, rows) by a scan of the offsets; the blocks past the last expert
// tile zero the rows outside [offsets[0], offsets[E]) instead; the rest exit. grid.y walks the
// output columns, so consecutive blocks (same column tile, next rows) reuse a weight tile from L2.
//
// A block computes 64 rows x 64 weight rows. Plain: weight row n0 + p is output column n0 + p.
// Gated (silu_and_mul): position p is the gate row (p even) or the up row (p odd) of output column
// n0 + p / 2, so every accumulator pair (p, p + 1) a thread holds is one gate / up pair, combined
// in registers; such a block covers 32 output columns.

#define GROUP_BM 64     // x rows per tile
#define GROUP_BN 64     // weight rows per tile
#define GROUP_BN_OUT(gated) ((gated) ? GROUP_BN / 2 : GROUP_BN)

// ---------------------------------------------------------------- SIMT
// 256 threads as 16 x 16; thread (ty, tx) owns tile rows 4 ty .. +3 and weight positions 4 tx .. +3
// (two pairs). Both operands are staged k-major in shared memory ([k][row], fp32) so that a
// thread's 4 rows / 4 positions are one float4; rows padded 64 -> 68 floats as in gemm_simt (the
// transposing stores then conflict 2-way at worst). Register prefetch of the next k slice.

#define GROUP_SIMT_THREADS 256
#define GROUP_SIMT_BK 16
#define GROUP_SIMT_STRIDE 68

template <typename T>
__global__ void __launch_bounds__(GROUP_SIMT_THREADS)
grouped_gemm_simt(const T* __restrict__ x, const T* __restrict__ w, const int* __restrict__ expert_offsets, T* __restrict__ out,
                  int R, int N, int K, int experts, int gated) {
    __shared__ float4 a_tile[GROUP_SIMT_BK][GROUP_SIMT_STRIDE / 4];
    __shared__ float4 b_tile[GROUP_SIMT_BK][GROUP_SIMT_STRIDE / 4];
    __shared__ RowTile shared_tile;
    const int n0 = blockIdx.y * GROUP_BN_OUT(gated);
    const RowTile tile = expert_row_tile<GROUP_BM>(expert_offsets, experts, R, &shared_tile);
    if (tile.rows <= 0) return;  // block-uniform
    if (tile.expert < 0) {
        zero_rows(out, tile, n0, GROUP_BN_OUT(gated), N);
        return;
    }
    float* a_flat = reinterpret_cast<float*>(&a_tile[0][0]);
    float* b_flat = reinterpret_cast<float*>(&b_tile[0][0]);
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;

    // Staged element q = tid + 256 r is (row q / 16, k q % 16): 16 lanes read 16 consecutive k of
    // one row. The rows a thread stages are the same for every k slice: resolve them once.
    const T* a_src[4];
    const T* b_src[4];
    const T* w_expert = w + (long long)tile.expert * (gated ? 2 * N : N) * K;
    for (int r = 0; r < 4; ++r) {
        const int row = tid / GROUP_SIMT_BK + 16 * r, wr = weight_row(row, n0, N, gated);
        a_src[r] = row < tile.rows ? x + (long long)(tile.row0 + row) * K : nullptr;
        b_src[r] = wr >= 0 ? w_expert + (long long)wr * K : nullptr;
    }

    float acc[4][4];
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

    float a_next[4], b_next[4];
    const int kk = tid % GROUP_SIMT_BK, slices = (K + GROUP_SIMT_BK - 1) / GROUP_SIMT_BK;
    for (int slice = 0; slice <= slices; ++slice) {
        if (slice > 0) {
            for (int r = 0; r < 4; ++r) {
                a_flat[kk * GROUP_SIMT_STRIDE + tid / GROUP_SIMT_BK + 16 * r] = a_next[r];
                b_flat[kk * GROUP_SIMT_STRIDE + tid / GROUP_SIMT_BK + 16 * r] = b_next[r];
            }
            __syncthreads();
        }
        if (slice < slices) {
            const int k = slice * GROUP_SIMT_BK + kk;
            for (int r = 0; r < 4; ++r) {
                a_next[r] = a_src[r] && k < K ? to_float(a_src[r][k]) : 0.0f;
                b_next[r] = b_src[r] && k < K ? to_float(b_src[r][k]) : 0.0f;
            }
        }
        if (slice > 0) {
            for (int k = 0; k < GROUP_SIMT_BK; ++k) {
                const float4 av = a_tile[k][ty], bv = b_tile[k][tx];
                const float ar[4] = {av.x, av.y, av.z, av.w}, br[4] = {bv.x, bv.y, bv.z, bv.w};
                for (int i = 0; i < 4; ++i)
                    for (int j = 0; j < 4; ++j) acc[i][j] += ar[i] * br[j];
            }
            __syncthreads();  // everyone is done reading before the next slice overwrites
        }
    }

    for (int i = 0; i < 4; ++i) {
        if (4 * ty + i >= tile.rows) continue;
        T* out_row = out + (long long)(tile.row0 + 4 * ty + i) * N;
        store_pair(out_row, N, n0, 4 * tx, acc[i][0], acc[i][1], gated);
        store_pair(out_row, N, n0, 4 * tx + 2, acc[i][2], acc[i][3], gated);
    }
}

// ---------------------------------------------------------------- tensor cores (mma.sync)
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

// Eight halves of a K-row from k on (zeros past K or for a missing row): one 16-byte load when
// the rows allow it, else element by element.
__device__ __forceinline__ uint4 load_row_chunk(const unsigned short* row, int k, int K, bool vec) {
    if (!row || k >= K) return make_uint4(0u, 0u, 0u, 0u);
    return vec ? *reinterpret_cast<const uint4*>(row + k) : load8_bits(row + k, min(8, K - k));
}

template <typename T>
__global__ void __launch_bounds__(GROUP_MMA_THREADS)
grouped_gemm_mma(const T* __restrict__ x, const T* __restrict__ w, const int* __restrict__ expert_offsets, T* __restrict__ out,
                 int R, int N, int K, int experts, int gated) {
    __shared__ uint4 a_tile[GROUP_BM * GROUP_MMA_ROW_UINT4];
    __shared__ uint4 b_tile[GROUP_BN * GROUP_MMA_ROW_UINT4];
    __shared__ RowTile shared_tile;
    const int n0 = blockIdx.y * GROUP_BN_OUT(gated);
    const RowTile tile = expert_row_tile<GROUP_BM>(expert_offsets, experts, R, &shared_tile);
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
    const int slices = (K + GROUP_MMA_BK - 1) / GROUP_MMA_BK;
    for (int slice = 0; slice <= slices; ++slice) {
        if (slice > 0) {
            for (int i = 0; i < 2; ++i) {
                const int q = tid + i * GROUP_MMA_THREADS;
                a_tile[(q >> 2) * GROUP_MMA_ROW_UINT4 + (q & 3)] = a_next[i];
                b_tile[(q >> 2) * GROUP_MMA_ROW_UINT4 + (q & 3)] = b_next[i];
            }
            __syncthreads();
        }
        if (slice < slices) {  // the next slice is in flight while this one is multiplied
            const int k = slice * GROUP_MMA_BK + k_chunk;
            for (int i = 0; i < 2; ++i) {
                a_next[i] = load_row_chunk(a_src[i], k, K, a_vec);
                b_next[i] = load_row_chunk(b_src[i], k, K, b_vec);
            }
        }
        if (slice > 0) {
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
            __syncthreads();  // everyone is done reading before the next slice overwrites
        }
    }

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
            for (int ni = 0; ni < 4; ++ni) store_pair(out_row, N, n0, warp_col + ni * 8 + 2 * t, acc[mi][ni][2 * h], acc[mi][ni][2 * h + 1], gated);
        }
}
