// Mixture of experts: routing, the expert-sorted token layout, gather / combine and the grouped
// GEMM over that layout. ops/moe.py is the executable semantics; docs/gpu-kernels.md the ABI.
//
//   moe_route<T>            one wave per token: scores, optional grouped selection, k arg-max rounds
//   moe_align_count<I>      histogram of expert ids (LDS bins, then global atomics)
//   moe_align_scatter<I>    one block per expert: offsets by a scan of the counts, then a stable
//                           compaction of its flat indices; one more block for the tail
//   moe_permute<T>          row gather x[sorted_ids / k] (zeros for padding)
//   moe_unpermute_index<I>  inverse map flat index -> row of y (I: the type of sorted_ids)
//   moe_unpermute<T>        per token: sum_j w[t, j] * y[row of (t, j)], fp32, j in order
//   grouped_gemm_simt<T>    out[r] = x[r] @ w[e]^T per expert segment, fp32 FMA, every target
//   grouped_gemm_mfma<T>    the same on v_mfma_f32_32x32x8 (f16 / bf16, gfx90a / gfx94x)
//
// Wave width: 64 on CDNA, 32 on RDNA (gfx10/11). Every loop over lanes starts from warpSize and
// per-wave LDS is indexed by threadIdx.x / warpSize; only the MFMA kernel, which exists on wave64
// targets alone, uses 64 as a constant. No kernel reads device data on the host's behalf: the
// routing-dependent sizes are found on the device.
#include "common.h"

#define NO_INDEX 0x7fffffff  // "no candidate" in arg-max pairs: ranks after every real index

// ================================================================== block-wide prefix sums

// Inclusive prefix sum over the wave in lane order: log2(warpSize) shuffle steps (6 on wave64).
// Every lane of the wave must be active (all call sites are outside divergent code).
__device__ __forceinline__ int wave_inclusive_scan(int v) {
    const int lane = threadIdx.x % warpSize;
    for (int d = 1; d < warpSize; d <<= 1) {
        const int below = __shfl(v, lane - d);
        if (lane >= d) v += below;
    }
    return v;
}

// Exclusive prefix sum of v over the block in thread order; `total` gets the block's sum.
// `scratch` holds HAL_MAX_WAVES ints of LDS. All threads must call it (two barriers; the leading
// one lets consecutive calls share the scratch). The wave totals (16 on wave64 at 1024 threads)
// are scanned by every wave itself, so no third barrier is needed.
__device__ __forceinline__ int block_exclusive_scan(int v, int* scratch, int& total) {
    const int lane = threadIdx.x % warpSize, wave = threadIdx.x / warpSize, waves = blockDim.x / warpSize;
    const int inclusive = wave_inclusive_scan(v);
    __syncthreads();
    if (lane == warpSize - 1) scratch[wave] = inclusive;
    __syncthreads();
    const int waves_inclusive = wave_inclusive_scan(lane < waves ? scratch[lane] : 0);
    total = __shfl(waves_inclusive, waves - 1);
    const int waves_before = __shfl(waves_inclusive, wave - 1);
    return (wave > 0 ? waves_before : 0) + inclusive - v;
}

// ================================================================== moe_route
// A token's E scores sit in LDS (lane l owns entries l, l + warpSize, ...), and top-k is k
// rounds of a wave arg-max over (value, index) pairs, each taking the best pair ranking after the
// previous winner: nothing is marked, and ties go to the lower index as in the reference.
// Experts of groups that were not kept hold NaN, which never ranks. LDS per token: E scores, E
// selection values, n_group group scores (sized by the glue). Block = ROUTE_TOKENS * 64 threads:
// one token per wave64; on wave32 RDNA the block has 8 waves and waves 4..7 idle (routing is a
// CDNA workload; the kernel only has to be correct there).

#define ROUTE_TOKENS 4
#define ROUTE_SIGMOID 1

// Whether (v, i) ranks before (w, j): the higher value, then the lower index. False for NaN v.
__device__ __forceinline__ bool ranks_before(float v, int i, float w, int j) { return v > w || (v == w && i < j); }

// Among values[0, n), the best pair ranking after (prev_v, prev_i), over the wave. Returns false
// (prev untouched) when there is none; otherwise every lane gets it in prev.
__device__ __forceinline__ bool wave_next(const float* values, int n, float& prev_v, int& prev_i) {
    float v = -INFINITY;
    int i = NO_INDEX;
    for (int e = threadIdx.x % warpSize; e < n; e += warpSize) {
        const float x = values[e];
        if (ranks_before(prev_v, prev_i, x, e) && ranks_before(x, e, v, i)) v = x, i = e;
    }
    for (int o = warpSize / 2; o > 0; o >>= 1) {
        const float other_v = __shfl_xor(v, o);
        const int other_i = __shfl_xor(i, o);
        if (ranks_before(other_v, other_i, v, i)) v = other_v, i = other_i;
    }
    if (i == NO_INDEX) return false;
    prev_v = v, prev_i = i;
    return true;
}

template <typename T>
__global__ __launch_bounds__(ROUTE_TOKENS * 64) void moe_route(const T* __restrict__ logits, const float* __restrict__ bias, float* __restrict__ topk_weights,
                                                              int* __restrict__ topk_ids, int tokens, int experts, int k, int scoring, int n_group,
                                                              int topk_group, int renormalize, float scaling) {
    HAL_DYNAMIC_SHARED(float, route_lds);
    const int lane = threadIdx.x % warpSize, wave = threadIdx.x / warpSize;
    const int t = blockIdx.x * ROUTE_TOKENS + wave;
    // Wave-uniform. Inactive waves still reach every __syncthreads below.
    const bool active = wave < ROUTE_TOKENS && t < tokens;
    float* score = route_lds + min(wave, ROUTE_TOKENS - 1) * (2 * experts + n_group);
    float* select = score + experts;  // score + bias: what ranks
    float* group_score = select + experts;

    if (active) {
        const T* row = logits + (long long)t * experts;
        if (scoring == ROUTE_SIGMOID) {
            for (int e = lane; e < experts; e += warpSize) score[e] = 1.0f / (1.0f + expf(-to_f32(row[e])));
        } else {
            float m = -INFINITY;
            for (int e = lane; e < experts; e += warpSize) m = fmaxf(m, score[e] = to_f32(row[e]));
            m = wave_max(m);
            float sum = 0.0f;
            for (int e = lane; e < experts; e += warpSize) sum += score[e] = expf(score[e] - m);
            sum = wave_sum(sum);
            for (int e = lane; e < experts; e += warpSize) score[e] = score[e] / sum;
        }
        for (int e = lane; e < experts; e += warpSize) select[e] = bias ? score[e] + bias[e] : score[e];
    }
    // Lanes read each other's entries from here on. A barrier, not just the wave's program order:
    // without one the compiler may move LDS reads of other lanes' entries above these writes.
    __syncthreads();

    if (n_group > 0) {  // block-uniform
        const int size = experts / n_group;
        if (active) {
            // Group score = sum of its two largest values, one lane per group (DeepSeek-V3: 8
            // groups of 32 entries, a short serial scan on 8 lanes).
            for (int g = lane; g < n_group; g += warpSize) {
                float first = -INFINITY, second = -INFINITY;
                for (int e = g * size; e < (g + 1) * size; ++e) {
                    const float v = select[e];
                    if (v > first) second = first, first = v;
                    else if (v > second) second = v;
                }
                group_score[g] = first + second;
            }
        }
        __syncthreads();
        if (active) {
            // The topk_group best groups: (kept_v, kept_i) ends as the last kept, and a group is
            // kept iff it ranks at or before it. Each lane masks only its own entries, the ones it
            // scans below, so no further barrier is needed.
            float kept_v = INFINITY;
            int kept_i = -1;
            for (int r = 0; r < topk_group; ++r) wave_next(group_score, n_group, kept_v, kept_i);
            for (int e = lane; e < experts; e += warpSize) {
                const int g = e / size;
                if (g != kept_i && !ranks_before(group_score[g], g, kept_v, kept_i)) select[e] = __builtin_nanf("");
            }
        }
    }
    if (!active) return;

    // k arg-max rounds; round j is written by lane j % warpSize, which then rescales its entries.
    float v = INFINITY, sum = 0.0f;
    int id = -1;
    const long long out0 = (long long)t * k;
    for (int j = 0; j < k; ++j) {
        const bool found = wave_next(select, experts, v, id);  // wave-uniform
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

// ================================================================== moe_align
// Deterministic by construction: counts come from atomics (a sum does not depend on their
// order), positions inside a segment from a stable block-wide compaction in flat index order.

#define ALIGN_COUNT_THREADS 256
#define ALIGN_THREADS 1024  // the compaction walks the ids in chunks of 1024 (16 waves)

// counts[e] += number of ids equal to e (counts zeroed by the glue). LDS bins (experts ints,
// dynamic): a hot expert costs LDS atomics, and each block adds one global atomic per expert.
template <typename I>
__global__ __launch_bounds__(ALIGN_COUNT_THREADS) void moe_align_count(const I* __restrict__ topk_ids, int* __restrict__ counts, int n, int experts) {
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

// Block e < experts: the flat indices with topk_ids[i] == e, ascending, from expert_offsets[e],
// then the sentinel n up to the padded end, and block_experts of its blocks. Block `experts`:
// expert_offsets, total, and the tail past the total (sentinels, block_experts -1). Every block
// finds its segment by an exclusive scan of the padded counts (a few hundred experts: one chunk,
// cheaper than a separate single-block launch); an expert block then walks the ids and stops once
// it has found counts[e] (an expert without tokens does not walk them at all).
template <typename I>
__global__ __launch_bounds__(ALIGN_THREADS) void moe_align_scatter(const I* __restrict__ topk_ids, const int* __restrict__ counts, int* __restrict__ sorted_ids,
                                                                  int* __restrict__ block_experts, int* __restrict__ expert_offsets, int* __restrict__ total,
                                                                  int n, int experts, int block_m, int capacity) {
    __shared__ int scratch[HAL_MAX_WAVES];
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

// ================================================================== moe_permute / moe_unpermute

#define PERMUTE_THREADS 256

// out[r] = x[sorted_ids[r] / k] for 0 <= sorted_ids[r] < valid (= T * k), zeros otherwise: a copy
// of bits, 16 bytes per lane and step (global_load_dwordx4) when the rows allow it.
template <typename T>
__global__ __launch_bounds__(PERMUTE_THREADS) void moe_permute(const T* __restrict__ x, const int* __restrict__ sorted_ids, T* __restrict__ out, int rows,
                                                               int hidden, int k, int valid) {
    const int r = blockIdx.x;
    if (r >= rows) return;
    const int id = sorted_ids[r];
    const T* src = id >= 0 && id < valid ? x + (long long)(id / k) * hidden : nullptr;
    T* dst = out + (long long)r * hidden;
    const bool vec = hidden * sizeof(T) % 16 == 0 && (reinterpret_cast<unsigned long long>(x) & 15) == 0 &&
                     (reinterpret_cast<unsigned long long>(out) & 15) == 0;
    if (vec) {
        const int chunks = hidden * sizeof(T) / 16;
        for (int c = threadIdx.x; c < chunks; c += blockDim.x)
            reinterpret_cast<uint4*>(dst)[c] = src ? reinterpret_cast<const uint4*>(src)[c] : make_uint4(0u, 0u, 0u, 0u);
    } else {
        for (int h = threadIdx.x; h < hidden; h += blockDim.x) dst[h] = src ? src[h] : from_f32<T>(0.0f);
    }
}

// row_of[f] = 1 + the row r with sorted_ids[r] == f. The glue zeroes row_of, so 0 means "in no
// row" (a skipped expert) without a separate fill kernel.
template <typename I>
__global__ __launch_bounds__(PERMUTE_THREADS) void moe_unpermute_index(const I* __restrict__ sorted_ids, int* __restrict__ row_of, int rows, int valid) {
    const int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= rows) return;
    const I id = sorted_ids[r];
    if (id >= 0 && id < valid) row_of[id] = r + 1;
}

// Four fp32 values rounded to T, stored at p (the first n of them): one 16-byte (float) or
// 8-byte (16-bit types) store when `vec`, else element by element.
template <typename T>
__device__ __forceinline__ void store4(T* p, int n, bool vec, const float v[4]) {
    if (vec && n >= 4) {
        struct alignas(4 * sizeof(T)) Quad {
            T e[4];
        } q;
        for (int i = 0; i < 4; ++i) q.e[i] = from_f32<T>(v[i]);
        *reinterpret_cast<Quad*>(p) = q;
    } else {
        for (int i = 0; i < 4; ++i)
            if (i < n) p[i] = from_f32<T>(v[i]);
    }
}

// One block per token; a lane owns 4-column chunks (a wave64 covers 256 consecutive columns per
// step) and sums its k rows in j order in fp32.
template <typename T>
__global__ __launch_bounds__(PERMUTE_THREADS) void moe_unpermute(const T* __restrict__ y, const int* __restrict__ row_of, const float* __restrict__ topk_weights,
                                                                 T* __restrict__ out, int tokens, int hidden, int k, int rows) {
    const int t = blockIdx.x;
    if (t >= tokens) return;
    const bool vec = hidden % 4 == 0 && aligned4(y) && aligned4(out);
    const int* slots = row_of + (long long)t * k;
    const float* weights = topk_weights + (long long)t * k;
    for (int c = 4 * threadIdx.x; c < hidden; c += 4 * blockDim.x) {
        float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int j = 0; j < k; ++j) {
            const int r = slots[j] - 1;
            if (r < 0 || r >= rows) continue;  // a skipped (token, slot) contributes 0
            float v[4];
            load4(y + (long long)r * hidden + c, hidden - c, vec, KV_NATIVE, v);
            const float w = weights[j];
            for (int e = 0; e < 4; ++e) acc[e] += w * v[e];
        }
        store4(out + (long long)t * hidden + c, hidden - c, vec, acc);
    }
}

// ================================================================== grouped GEMM
// out[r] = x[r] @ w[e]^T for offsets[e] <= r < offsets[e + 1]; w is [E, N, K] (gated: [E, 2N, K]),
// K-contiguous like x: both operands are rows of K and stage the same way, k-contiguous in LDS,
// which is what MFMA wants for A and for B (4 consecutive k per lane).
//
// Work split (expert_row_tile in common.h): an expert's segment is cut into 64-row tiles numbered
// in expert order; grid.x is an upper bound on their number, ceil(R / 64) + E + 1. A block finds
// its (expert, rows) by a scan of the offsets; blocks past the last expert tile zero the rows
// outside [offsets[0], offsets[E]); the rest exit. grid.y walks the output columns, so blocks with
// consecutive ids share a weight tile through L2.
//
// A block computes 64 rows x 64 weight rows. Plain: weight row n0 + p is output column n0 + p.
// Gated (silu_and_mul): position p is the gate row (p even) or the up row (p odd) of output
// column n0 + p / 2; such a block covers 32 output columns.

#define GROUP_BM 64
#define GROUP_BN 64
#define GROUP_BN_OUT(gated) ((gated) ? GROUP_BN / 2 : GROUP_BN)

// ------------------------------------------------------------------ SIMT
// 256 threads as 16 x 16; thread (ty, tx) owns rows 4 ty .. +3 and positions 4 tx .. +3 (two
// pairs). Both tiles live in LDS k-major as fp32 ([k][row / 4] float4), so a thread's 4 rows and 4
// positions are one ds_read_b128 each; the rows are padded by one float4 so that the transposing
// stores (16 lanes, 16 k, same row) spread over banks. Loads of the next K slice are in flight
// during the FMAs of the current one.

#define GROUP_SIMT_THREADS 256
#define GROUP_SIMT_BK 16

template <typename T>
__global__ __launch_bounds__(GROUP_SIMT_THREADS) void grouped_gemm_simt(const T* __restrict__ x, const T* __restrict__ w, const int* __restrict__ expert_offsets,
                                                                        T* __restrict__ out, int R, int N, int K, int experts, int gated) {
    __shared__ float4 As[GROUP_SIMT_BK][GROUP_BM / 4 + 1];  // 4352 B
    __shared__ float4 Bs[GROUP_SIMT_BK][GROUP_BN / 4 + 1];  // 4352 B
    __shared__ RowTile lds_tile;
    const int n0 = blockIdx.y * GROUP_BN_OUT(gated);
    const RowTile tile = expert_row_tile<GROUP_BM>(expert_offsets, experts, R, &lds_tile);
    if (tile.rows <= 0) return;  // block-uniform
    if (tile.expert < 0) {
        zero_rows(out, tile, n0, GROUP_BN_OUT(gated), N);
        return;
    }
    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;

    // Thread stages k = tid % 16 of rows tid / 16 + 16 r (16 lanes read 16 consecutive k of a
    // row); the rows are the same for every slice, so their addresses are resolved once.
    const int kk = tid % GROUP_SIMT_BK, row = tid / GROUP_SIMT_BK;
    const T* w_expert = w + (long long)tile.expert * (gated ? 2 * N : N) * K;
    const T* a_src[4];
    const T* b_src[4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const int wr = weight_row(row + 16 * r, n0, N, gated);
        a_src[r] = row + 16 * r < tile.rows ? x + (long long)(tile.row0 + row + 16 * r) * K : nullptr;
        b_src[r] = wr >= 0 ? w_expert + (long long)wr * K : nullptr;
    }
    float ra[4], rb[4];
    auto fetch = [&](int k0) {
        const int k = k0 + kk;
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            ra[r] = a_src[r] && k < K ? to_f32(a_src[r][k]) : 0.0f;
            rb[r] = b_src[r] && k < K ? to_f32(b_src[r][k]) : 0.0f;
        }
    };

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

    fetch(0);
    for (int k0 = 0; k0 < K; k0 += GROUP_SIMT_BK) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            reinterpret_cast<float*>(As[kk])[row + 16 * r] = ra[r];
            reinterpret_cast<float*>(Bs[kk])[row + 16 * r] = rb[r];
        }
        __syncthreads();
        if (k0 + GROUP_SIMT_BK < K) fetch(k0 + GROUP_SIMT_BK);  // in flight during the math below
#pragma unroll
        for (int k = 0; k < GROUP_SIMT_BK; ++k) {
            const float4 av = As[k][ty], bv = Bs[k][tx];
            const float am[4] = {av.x, av.y, av.z, av.w}, bn[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] += am[i] * bn[j];
        }
        __syncthreads();  // the next iteration overwrites the tiles
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
        if (4 * ty + i >= tile.rows) continue;
        T* out_row = out + (long long)(tile.row0 + 4 * ty + i) * N;
        store_pair(out_row, N, n0, 4 * tx, acc[i][0], acc[i][1], gated);
        store_pair(out_row, N, n0, 4 * tx + 2, acc[i][2], acc[i][3], gated);
    }
}

// ------------------------------------------------------------------ MFMA
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

// Eight 16-bit elements of a K-row from k on, as raw bits (zeros past K or for a missing row):
// one 16-byte load when `vec` (aligned rows), else element by element.
__device__ __forceinline__ uint4 row_chunk(const unsigned short* row, int k, int K, bool vec) {
    if (!row || k >= K) return make_uint4(0u, 0u, 0u, 0u);
    if (vec) return *reinterpret_cast<const uint4*>(row + k);
    unsigned u[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int e = 0; e < 8; ++e)
        if (k + e < K) u[e / 2] |= (unsigned)row[k + e] << (16 * (e % 2));
    return make_uint4(u[0], u[1], u[2], u[3]);
}

template <typename T>
__global__ __launch_bounds__(GROUP_MFMA_THREADS) void grouped_gemm_mfma(const T* __restrict__ x, const T* __restrict__ w, const int* __restrict__ expert_offsets,
                                                                        T* __restrict__ out, int R, int N, int K, int experts, int gated) {
    __shared__ uint2 As[GROUP_BM * GROUP_MFMA_ROW_UINT2];  // [row][k], 4608 B
    __shared__ uint2 Bs[GROUP_BN * GROUP_MFMA_ROW_UINT2];  // [weight row][k], 4608 B
    __shared__ RowTile lds_tile;
    const int n0 = blockIdx.y * GROUP_BN_OUT(gated);
    const RowTile tile = expert_row_tile<GROUP_BM>(expert_offsets, experts, R, &lds_tile);
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
    uint4 ra = row_chunk(a_src, 8 * s_chunk, K, a_vec), rb = row_chunk(b_src, 8 * s_chunk, K, b_vec);

    float acc[16];
#pragma unroll
    for (int r = 0; r < 16; ++r) acc[r] = 0.0f;

    for (int k0 = 0; k0 < K; k0 += GROUP_MFMA_BK) {
        uint2* a_dst = As + s_row * GROUP_MFMA_ROW_UINT2 + 2 * s_chunk;
        uint2* b_dst = Bs + s_row * GROUP_MFMA_ROW_UINT2 + 2 * s_chunk;
        a_dst[0] = make_uint2(ra.x, ra.y), a_dst[1] = make_uint2(ra.z, ra.w);
        b_dst[0] = make_uint2(rb.x, rb.y), b_dst[1] = make_uint2(rb.z, rb.w);
        __syncthreads();
        if (k0 + GROUP_MFMA_BK < K) {  // the next slice's loads overlap the MFMAs
            ra = row_chunk(a_src, k0 + GROUP_MFMA_BK + 8 * s_chunk, K, a_vec);
            rb = row_chunk(b_src, k0 + GROUP_MFMA_BK + 8 * s_chunk, K, b_vec);
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
            if (row < tile.rows) out[(long long)(tile.row0 + row) * N + n0 + p] = from_f32<T>(acc[r]);
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
        const float other = __shfl_xor(odd ? acc[i] : acc[i + 8], 1);
        const int r = odd ? i + 8 : i;
        const int row = wm + 8 * (r / 4) + 4 * (lane / 32) + r % 4;
        if (row < tile.rows) store_pair(out + (long long)(tile.row0 + row) * N, N, n0, p & ~1, odd ? other : mine, odd ? mine : other, 1);
    }
}
