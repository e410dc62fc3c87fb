// Sparse ops of recommendation models: embedding_bag<T, I> and spmm_csr<T, I>. Semantics in
// ops/sparse.py, ABI in docs/gpu-kernels.md. T is the element type, I the index type (int or
// long long) of the ids and of the offsets / indptr.
//
// Both are one gather-reduce: segment s (a bag, or a row of the CSR matrix) covers the entries
// [offsets[s], offsets[s + 1]); entry e adds w[e] * table[ids[e]] to output row s (or takes the
// max). spmm_csr is the "sum" mode with the matrix values as weights and the dense matrix as the
// table, so both kernels call reduce_segments below.
//
// Work split: a segment is served by a group of G lanes, G the smallest power of two with
// 8 * G >= D, at most 32; lane `sub` owns the 8-element chunks sub, sub + G, ... of the output row.
// D = 128 thus takes 16 lanes and a warp reduces two bags at once, so small embedding dims keep
// every lane busy. Per entry, a lane loads its chunk of the gathered row: 16 bytes (two float4 for
// float) when rows are 16-byte aligned, element by element otherwise; the G lanes of a group read
// one contiguous, coalesced piece of the row. The lanes of a group all read the entry's id (one
// broadcast transaction), which needs no shuffle and so no convergence: groups of one warp may
// run segments of different lengths. Four entries are loaded before any is accumulated, so four
// row loads are in flight per lane (gathers are latency-bound: each row is a random address).
// Groups stride over the segments (grid-stride), so any grid covers any number of segments.
//
// Accumulation is fp32 in registers; ids outside [0, rows) and the padding id are skipped, and
// offsets are clamped to [0, length]: nothing is read out of bounds even for invalid inputs.
#include "common.cuh"

#define SPARSE_THREADS 256
#define SPARSE_CHUNK 8   // elements per lane and row load: 16 bytes of a 16-bit type
#define SPARSE_INFLIGHT 4  // entries whose rows are loaded before they are accumulated
// Blocks per SM the register budget must allow (at most 128 registers a thread). Without it ptxas
// aims for 3-4 blocks and spills the rows in flight; 2 x 8 warps with 4 rows each in flight are
// plenty to cover memory latency (the gather is bound by it, not by occupancy).
#define SPARSE_MIN_BLOCKS 2

#define SEGMENT_SUM 0
#define SEGMENT_MEAN 1
#define SEGMENT_MAX 2

// One lane's 8 elements of a row in their own type: 16 bytes for 16-bit types, 32 for float.
// Loaded rows stay in this form until they are accumulated, so the rows in flight of a 16-bit
// table take 4 registers each rather than 8 (widened to fp32 one element at a time).
template <typename T>
struct alignas(16) Chunk {
    T e[SPARSE_CHUNK];
};

// 16-byte loads when `vec` (the caller checked alignment) and the chunk is whole; else element by
// element, zero past `valid`. Loops have constant trip counts so that chunks stay in registers.
template <typename T>
__device__ __forceinline__ void load_chunk(Chunk<T>& c, const T* p, int valid, bool vec) {
    if (vec && valid == SPARSE_CHUNK) {
#pragma unroll
        for (int i = 0; i < (int)sizeof(Chunk<T>) / 16; ++i) reinterpret_cast<uint4*>(c.e)[i] = reinterpret_cast<const uint4*>(p)[i];
    } else {
#pragma unroll
        for (int i = 0; i < SPARSE_CHUNK; ++i) c.e[i] = i < valid ? p[i] : from_float<T>(0.0f);
    }
}

template <typename T>
__device__ __forceinline__ void store_chunk(T* p, const float v[SPARSE_CHUNK], int valid, bool vec) {
    Chunk<T> c;
#pragma unroll
    for (int i = 0; i < SPARSE_CHUNK; ++i) c.e[i] = from_float<T>(v[i]);
    if (vec && valid == SPARSE_CHUNK) {
#pragma unroll
        for (int i = 0; i < (int)sizeof(Chunk<T>) / 16; ++i) reinterpret_cast<uint4*>(p)[i] = reinterpret_cast<const uint4*>(c.e)[i];
    } else {
#pragma unroll
        for (int i = 0; i < SPARSE_CHUNK; ++i)
            if (i < valid) p[i] = c.e[i];
    }
}

// Lanes per segment: a power of two (so groups never straddle a warp) covering the row in chunks.
__device__ __forceinline__ int group_lanes(int dim) {
    const int chunks = (dim + SPARSE_CHUNK - 1) / SPARSE_CHUNK;
    int lanes = 1;
    while (lanes < chunks && lanes < warpSize) lanes <<= 1;
    return lanes;
}

template <typename I>
__device__ __forceinline__ long long clamped(I offset, long long low, long long high) {
    return min(max((long long)offset, low), high);
}

// out[s] = the sum (MAX: the max) over e in [offsets[s], offsets[s + 1]) of weights[e] * table[ids[e]],
// divided by the count of entries if `mean`; table [rows, dim], out [segments, dim]; weights may be
// null (all ones). MAX is a template parameter so that each mode gets its own, leaner code path.
template <bool MAX, typename T, typename I>
__device__ __forceinline__ void reduce_segments(const T* __restrict__ table, const I* __restrict__ ids, const I* __restrict__ offsets,
                                                const T* __restrict__ weights, T* __restrict__ out, int segments, int rows, int dim,
                                                long long length, bool mean, int padding_idx) {
    const int lanes = group_lanes(dim);
    const int sub = threadIdx.x % lanes;
    const long long first = ((long long)blockIdx.x * blockDim.x + threadIdx.x) / lanes;
    const long long stride = (long long)gridDim.x * blockDim.x / lanes;
    const bool vec = chunks_aligned(table, dim) && chunks_aligned(out, dim);

    for (long long s = first; s < segments; s += stride) {
        const long long start = clamped(offsets[s], 0, length), end = clamped(offsets[s + 1], start, length);
        for (int col = sub * SPARSE_CHUNK; col < dim; col += lanes * SPARSE_CHUNK) {
            const int valid = min(SPARSE_CHUNK, dim - col);
            float acc[SPARSE_CHUNK];
#pragma unroll
            for (int i = 0; i < SPARSE_CHUNK; ++i) acc[i] = MAX ? -INFINITY : 0.0f;
            int count = 0;
            for (long long e0 = start; e0 < end; e0 += SPARSE_INFLIGHT) {
                int row[SPARSE_INFLIGHT];
                float w[SPARSE_INFLIGHT];
                Chunk<T> v[SPARSE_INFLIGHT];
#pragma unroll
                for (int u = 0; u < SPARSE_INFLIGHT; ++u) {
                    const long long e = e0 + u;
                    const long long id = e < end ? (long long)ids[e] : -1;
                    row[u] = (id >= 0 && id < rows && id != padding_idx) ? (int)id : -1;
                    w[u] = (!MAX && row[u] >= 0 && weights) ? to_float(weights[e]) : 1.0f;
                    if (row[u] >= 0) load_chunk(v[u], table + (long long)row[u] * dim + col, valid, vec);
                }
#pragma unroll
                for (int u = 0; u < SPARSE_INFLIGHT; ++u) {
                    if (row[u] < 0) continue;
                    ++count;
#pragma unroll
                    for (int i = 0; i < SPARSE_CHUNK; ++i) {
                        const float x = to_float(v[u].e[i]);
                        acc[i] = MAX ? fmaxf(acc[i], x) : acc[i] + w[u] * x;
                    }
                }
            }
            // An empty segment (or one of only padding) is zeros in every mode.
            const float scale = mean && count ? 1.0f / (float)count : 1.0f;
#pragma unroll
            for (int i = 0; i < SPARSE_CHUNK; ++i) acc[i] = count ? acc[i] * scale : 0.0f;
            store_chunk(out + s * dim + col, acc, valid, vec);
        }
    }
}

template <typename T, typename I>
__global__ void __launch_bounds__(SPARSE_THREADS, SPARSE_MIN_BLOCKS)
embedding_bag(const T* __restrict__ table, const I* __restrict__ indices, const I* __restrict__ offsets, const T* __restrict__ per_sample_weights,
              T* __restrict__ out, int bags, int rows, int dim, long long length, int mode, int padding_idx) {
    if (mode == SEGMENT_MAX)
        reduce_segments<true>(table, indices, offsets, per_sample_weights, out, bags, rows, dim, length, false, padding_idx);
    else
        reduce_segments<false>(table, indices, offsets, per_sample_weights, out, bags, rows, dim, length, mode == SEGMENT_MEAN, padding_idx);
}

template <typename T, typename I>
__global__ void __launch_bounds__(SPARSE_THREADS, SPARSE_MIN_BLOCKS)
spmm_csr(const I* __restrict__ indptr, const I* __restrict__ indices, const T* __restrict__ values, const T* __restrict__ dense,
         T* __restrict__ out, int m, int k, int n, long long nnz) {
    reduce_segments<false>(dense, indices, indptr, values, out, m, k, n, nnz, false, -1);
}
