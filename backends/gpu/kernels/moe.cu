// Written once for both vendors in CUDA's dialect; compiled as HIP for AMD through the vendor
// shim hal_vendor.h (docs/gpu-kernels.md).
// Mixture of experts: routing, the expert-sorted token layout, gather / combine and the grouped
// GEMM over that layout. ops/moe.py is the executable semantics; docs/gpu-kernels.md the ABI.
//
//   moe_route<T>            one warp / wave per token: scores, optional grouped selection, k arg-max rounds
//   moe_align_count<I>      histogram of expert ids (shared-memory / LDS bins, then global atomics)
//   moe_align_scatter<I>    one block per expert: offsets by a scan of the counts, then a stable
//                           compaction of its flat indices; one more block for the tail
//   moe_permute<T>          row gather x[sorted_ids / k] (zeros for padding)
//   moe_unpermute_index<I>  inverse map flat index -> row of y (I: the type of sorted_ids)
//   moe_unpermute<T>        per token: sum_j w[t, j] * y[row of (t, j)], fp32, j in order
//   grouped_gemm_simt<T>    out[r] = act(x[r] @ w[e]^T) per expert segment (or gated), fp32 FMA, every target
// The tensor-op grouped GEMMs (grouped_gemm_mma / grouped_gemm_mfma) are vendor files: grouped_gemm.cu
// in backends/cuda and grouped_gemm.hip in backends/rocm.
//
// Nothing here reads device data on the host: every size that depends on the routing (segment
// lengths, the padded total, which tile a block works on) is found by the kernels themselves.
//
// Warp width: 32 on NVIDIA, 64 on CDNA, 32 on RDNA. Every loop over lanes starts from warpSize and
// per-warp shared memory is indexed by threadIdx.x / warpSize.
#include "hal_gpu.h"

#define NO_INDEX 0x7fffffff  // "no candidate" in arg-max pairs: ranks after every real index

// ================================================================ block-wide prefix sums

// Exclusive prefix sum of v over the block in thread order; `total` receives the block's sum.
// `scratch` is __shared__ int[HAL_MAX_WARPS]. Every thread must call it (it has barriers); the
// leading barrier makes back-to-back calls with the same scratch safe.
__device__ __forceinline__ int block_exclusive_scan(int v, int* scratch, int& total) {
    const int lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize;
    const int inclusive = warp_inclusive_scan(v);
    __syncthreads();
    if (lane == warpSize - 1) scratch[warp] = inclusive;
    __syncthreads();
    // Every warp scans the warp totals itself: no broadcast slot, no third barrier.
    const int warps_inclusive = warp_inclusive_scan(lane < warps_per_block() ? scratch[lane] : 0);
    total = warp_shfl(warps_inclusive, warps_per_block() - 1);
    const int warps_before = warp_shfl(warps_inclusive, warp - 1);
    return (warp > 0 ? warps_before : 0) + inclusive - v;
}

// ================================================================ moe_route
// A token's E scores sit in shared memory (lane l owns entries l, l + warpSize, ...), and top-k is k
// rounds of a warp arg-max over (value, index) pairs, each taking the best pair ranking after the
// previous winner: nothing is marked. The order is torch.topk's: NaN ranks before every number,
// equal values (several NaN too) go to the lower index. Experts of groups that were not kept hold
// -inf, as torch's masked_fill gives them. Shared memory per token: E
// scores, E selection values, n_group group scores (sized by the glue). Block = ROUTE_TOKENS *
// HAL_WARP_MAX threads: one token per warp (NVIDIA) or wave64 (CDNA); on wave32 RDNA the block has
// 8 waves and waves 4..7 idle (routing is a CDNA workload; the kernel only has to be correct there).

#define ROUTE_TOKENS 4

// Whether value v ranks before value w: NaN first, then the higher number.
__device__ __forceinline__ bool greater(float v, float w) { return v != v ? w == w : v > w; }

// Whether (v, i) ranks before (w, j): the greater value, then (equal, or both NaN) the lower index.
// (NaN, -1) ranks before every pair: the "nothing yet" previous winner.
__device__ __forceinline__ bool ranks_before(float v, int i, float w, int j) {
    return greater(v, w) || (!greater(w, v) && i < j);
}

// Among values[0, n), the best pair ranking after (prev_v, prev_i), over the warp. Returns false
// (prev untouched) when there is none; otherwise every lane gets it in prev.
__device__ __forceinline__ bool warp_next(const float* values, int n, float& prev_v, int& prev_i) {
    float v = -INFINITY;
    int i = NO_INDEX;
    for (int e = threadIdx.x % warpSize; e < n; e += warpSize) {
        const float x = values[e];
        if (ranks_before(prev_v, prev_i, x, e) && ranks_before(x, e, v, i)) v = x, i = e;
    }
    for (int o = warpSize / 2; o > 0; o >>= 1) {
        const float other_v = warp_shfl_xor(v, o);
        const int other_i = warp_shfl_xor(i, o);
        if (ranks_before(other_v, other_i, v, i)) v = other_v, i = other_i;
    }
    if (i == NO_INDEX) return false;
    prev_v = v, prev_i = i;
    return true;
}

template <typename T>
__global__ void __launch_bounds__(ROUTE_TOKENS * HAL_WARP_MAX) moe_route(const T* __restrict__ logits, const float* __restrict__ bias, float* __restrict__ topk_weights,
                                                              int* __restrict__ topk_ids, int tokens, int experts, int k, int scoring, int n_group,
                                                              int topk_group, int renormalize, float scaling) {
    HAL_DYNAMIC_SHARED(float, route_shared);
    const int lane = threadIdx.x % warpSize, warp = threadIdx.x / warpSize;
    const int t = blockIdx.x * ROUTE_TOKENS + warp;
    // Warp-uniform. Inactive warps still reach every __syncthreads below.
    const bool active = warp < ROUTE_TOKENS && t < tokens;
    float* score = route_shared + min(warp, ROUTE_TOKENS - 1) * (2 * experts + n_group);
    float* select = score + experts;  // score + bias: what ranks
    float* group_score = select + experts;

    if (active) {
        const T* row = logits + (long long)t * experts;
        if (scoring == HAL_ROUTE_SIGMOID) {
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
    }
    // Lanes read each other's entries from here on. A barrier, not just the wave's program order:
    // without one the compiler may move shared-memory reads of other lanes' entries above these writes.
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
                    if (greater(v, first)) second = first, first = v;
                    else if (greater(v, second)) second = v;
                }
                group_score[g] = first + second;
            }
        }
        __syncthreads();
        if (active) {
            // The topk_group best groups: (kept_v, kept_i) ends as the last kept, and a group is
            // kept iff it ranks at or before it. Each lane masks only its own entries, the ones it
            // scans below, so no further barrier is needed.
            float kept_v = HAL_QUIET_NAN;
            int kept_i = -1;
            for (int r = 0; r < topk_group; ++r) warp_next(group_score, n_group, kept_v, kept_i);
            for (int e = lane; e < experts; e += warpSize) {
                const int g = e / size;
                if (g != kept_i && !ranks_before(group_score[g], g, kept_v, kept_i)) select[e] = -INFINITY;
            }
        }
    }
    if (!active) return;

    // k arg-max rounds; round j is written by lane j % warpSize, which then rescales its entries.
    float v = HAL_QUIET_NAN, sum = 0.0f;
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
    if (vec && valid >= 8) {  // 16-bit bits packed in words (no array of 16-bit structs: scratch on AMD)
        unsigned w[4] = {0u, 0u, 0u, 0u};
        for (int i = 0; i < 8; ++i) w[i >> 1] |= (unsigned)__builtin_bit_cast(unsigned short, from_float<T>(v[i])) << (16 * (i & 1));
        *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
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

// ================================================================ grouped GEMM (grouped_tile.h)
#include "grouped_tile.h"

// ---------------------------------------------------------------- SIMT
// 256 threads as 16 x 16; thread (ty, tx) owns tile rows 4 ty .. +3 and weight positions 4 tx .. +3
// (two pairs). Both operands are staged k-major in shared memory as fp32 ([k][row / 4] float4), so
// a thread's 4 rows and 4 positions are one 16-byte read each; rows are padded by one float4 so
// that the transposing stores (16 lanes, 16 k, same row) spread over banks. The next K slice is in
// flight in registers during the FMAs of the current one: prefetch_main_loop's order, written out
// (through its lambdas clang gives this kernel 30 more VGPRs on CDNA; ptxas is indifferent).

#define GROUP_SIMT_THREADS 256
#define GROUP_SIMT_BK 16

template <typename T>
__global__ void __launch_bounds__(GROUP_SIMT_THREADS)
grouped_gemm_simt(const T* __restrict__ x, const T* __restrict__ w, const int* __restrict__ expert_rows, T* __restrict__ out,
                  int R, int N, int K, int experts, int rows_per_expert, int activation, int gated) {
    __shared__ float4 As[GROUP_SIMT_BK][GROUP_BM / 4 + 1];  // 4352 B: rows padded by one float4
    __shared__ float4 Bs[GROUP_SIMT_BK][GROUP_BN / 4 + 1];  // 4352 B
    __shared__ RowTile shared_tile;
    const int n0 = blockIdx.y * GROUP_BN_OUT(gated);
    const RowTile tile = expert_row_tile<GROUP_BM>(expert_rows, experts, R, rows_per_expert, &shared_tile);
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
    for (int r = 0; r < 4; ++r) {
        const int wr = weight_row(row + 16 * r, n0, N, gated);
        a_src[r] = row + 16 * r < tile.rows ? x + (long long)(tile.row0 + row + 16 * r) * K : nullptr;
        b_src[r] = wr >= 0 ? w_expert + (long long)wr * K : nullptr;
    }
    float ra[4], rb[4];
    auto fetch = [&](int k0) {
        const int k = k0 + kk;
        for (int r = 0; r < 4; ++r) {
            ra[r] = a_src[r] && k < K ? to_float(a_src[r][k]) : 0.0f;
            rb[r] = b_src[r] && k < K ? to_float(b_src[r][k]) : 0.0f;
        }
    };

    float acc[4][4];
    for (int i = 0; i < 4; ++i)
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

    fetch(0);
    for (int k0 = 0; k0 < K; k0 += GROUP_SIMT_BK) {
        for (int r = 0; r < 4; ++r) {
            reinterpret_cast<float*>(As[kk])[row + 16 * r] = ra[r];
            reinterpret_cast<float*>(Bs[kk])[row + 16 * r] = rb[r];
        }
        __syncthreads();
        if (k0 + GROUP_SIMT_BK < K) fetch(k0 + GROUP_SIMT_BK);  // in flight during the math below
        for (int k = 0; k < GROUP_SIMT_BK; ++k) {
            const float4 av = As[k][ty], bv = Bs[k][tx];
            const float am[4] = {av.x, av.y, av.z, av.w}, bn[4] = {bv.x, bv.y, bv.z, bv.w};
            for (int i = 0; i < 4; ++i)
                for (int j = 0; j < 4; ++j) acc[i][j] += am[i] * bn[j];
        }
        __syncthreads();  // the next iteration overwrites the tiles
    }

    for (int i = 0; i < 4; ++i) {
        if (4 * ty + i >= tile.rows) continue;
        T* out_row = out + (long long)(tile.row0 + 4 * ty + i) * N;
        store_pair(out_row, N, n0, 4 * tx, acc[i][0], acc[i][1], activation, gated);
        store_pair(out_row, N, n0, 4 * tx + 2, acc[i][2], acc[i][3], activation, gated);
    }
}

