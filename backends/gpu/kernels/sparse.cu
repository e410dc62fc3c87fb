// Written once for both vendors in CUDA's dialect; compiled as HIP for AMD through the vendor
// shim hal_vendor.h (docs/gpu-kernels.md).
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
#include "hal_gpu.h"

#define SPARSE_THREADS 256
#define SPARSE_CHUNK 8     // elements per lane and row load: 16 bytes of a 16-bit type
#define SPARSE_INFLIGHT 4  // entries whose rows are loaded before they are accumulated
// CUDA: blocks per SM the register budget must allow (at most 128 registers a thread). Without it
// ptxas aims for 3-4 blocks and spills the rows in flight; 2 x 8 warps with 4 rows each in flight
// are plenty to cover memory latency (the gather is bound by it, not by occupancy). HIP: plain
// __launch_bounds__(256) (see the shim).
#define SPARSE_MIN_BLOCKS 2

// The bits of an element, zero-extended, and back (little-endian: the low bytes of the word).
template <typename T>
__device__ __forceinline__ unsigned bits_of(T x) {
    if constexpr (sizeof(T) == 4) return __builtin_bit_cast(unsigned, x);
    else return __builtin_bit_cast(unsigned short, x);
}

template <typename T>
__device__ __forceinline__ T of_bits(unsigned bits) {
    if constexpr (sizeof(T) == 4) return __builtin_bit_cast(T, bits);
    else return __builtin_bit_cast(T, (unsigned short)bits);
}

// One lane's 8 elements of a row, kept raw as 32-bit words (4 for a 16-bit type, 8 for float)
// until accumulated: four rows in flight cost 16 VGPRs for a 16-bit table instead of 32. Words,
// not a T[8]: clang cannot split a 128-bit load stored into an array of 16-bit structs into
// registers and would keep such an array in scratch memory.
template <typename T>
struct Chunk {
    static constexpr int PER_WORD = 4 / (int)sizeof(T);
    static constexpr int WORDS = SPARSE_CHUNK / PER_WORD;
    unsigned w[WORDS];

    // Element i (a constant after unrolling) as fp32; put() ORs an element into a cleared chunk.
    __device__ __forceinline__ float get(int i) const { return to_float(of_bits<T>(w[i / PER_WORD] >> shift(i))); }
    __device__ __forceinline__ void put(int i, T x) { w[i / PER_WORD] |= bits_of(x) << shift(i); }
    __device__ __forceinline__ void clear() {
#pragma unroll
        for (int k = 0; k < WORDS; ++k) w[k] = 0;
    }
    static __device__ __forceinline__ int shift(int i) { return 32 / PER_WORD * (i % PER_WORD); }
};

// dwordx4 loads when `vec` (the caller checked alignment) and the chunk is whole; else element by
// element, zero past `valid`. Constant trip counts keep every array in VGPRs.
template <typename T>
__device__ __forceinline__ void load_chunk(Chunk<T>& c, const T* p, int valid, bool vec) {
    if (vec && valid == SPARSE_CHUNK) {
#pragma unroll
        for (int q = 0; q < Chunk<T>::WORDS / 4; ++q) {
            const uint4 r = reinterpret_cast<const uint4*>(p)[q];
            c.w[4 * q] = r.x, c.w[4 * q + 1] = r.y, c.w[4 * q + 2] = r.z, c.w[4 * q + 3] = r.w;
        }
    } else {
        c.clear();
#pragma unroll
        for (int i = 0; i < SPARSE_CHUNK; ++i)
            if (i < valid) c.put(i, p[i]);
    }
}

template <typename T>
__device__ __forceinline__ void store_chunk(T* p, const float v[SPARSE_CHUNK], int valid, bool vec) {
    if (vec && valid == SPARSE_CHUNK) {
        Chunk<T> c;
        c.clear();
#pragma unroll
        for (int i = 0; i < SPARSE_CHUNK; ++i) c.put(i, from_float<T>(v[i]));
#pragma unroll
        for (int q = 0; q < Chunk<T>::WORDS / 4; ++q)
            reinterpret_cast<uint4*>(p)[q] = make_uint4(c.w[4 * q], c.w[4 * q + 1], c.w[4 * q + 2], c.w[4 * q + 3]);
    } else {
#pragma unroll
        for (int i = 0; i < SPARSE_CHUNK; ++i)
            if (i < valid) p[i] = from_float<T>(v[i]);
    }
}

template <typename I>
__device__ __forceinline__ long long clamped(I offset, long long low, long long high) {
    return min(max((long long)offset, low), high);
}

// out[s] = the sum (MAX: the max) over e in [offsets[s], offsets[s + 1]) of weights[e] * table[ids[e]],
// divided by the count of entries if `mean`; table [rows, dim], out [segments, dim]; weights may be
// null (all ones). MAX is a template parameter: each mode gets its own code path and VGPR budget.
template <bool MAX, typename T, typename I>
__device__ __forceinline__ void reduce_segments(const T* __restrict__ table, const I* __restrict__ ids, const I* __restrict__ offsets,
                                                const T* __restrict__ weights, T* __restrict__ out, int segments, int rows, int dim,
                                                long long length, bool mean, int padding_idx) {
    // Group size from the run-time wave width: the same binary shape works for wave64 and wave32.
    const int chunks = (dim + SPARSE_CHUNK - 1) / SPARSE_CHUNK;
    int lanes = 1;
    while (lanes < chunks && lanes < warpSize) lanes <<= 1;
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
                // Issue all loads of the batch first, then accumulate: s_waitcnt then waits once
                // for the batch rather than once per row.
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
                        const float x = v[u].get(i);
                        acc[i] = MAX ? (x > acc[i] || x != x ? x : acc[i]) : acc[i] + w[u] * x;  // max: a NaN wins and stays
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
__global__ void HAL_LAUNCH_BOUNDS_MIN_BLOCKS(SPARSE_THREADS, SPARSE_MIN_BLOCKS) embedding_bag(const T* __restrict__ table, const I* __restrict__ indices, const I* __restrict__ offsets,
                                                                const T* __restrict__ per_sample_weights, T* __restrict__ out, int bags, int rows,
                                                                int dim, long long length, int mode, int padding_idx) {
    if (mode == HAL_BAG_MAX)
        reduce_segments<true>(table, indices, offsets, per_sample_weights, out, bags, rows, dim, length, false, padding_idx);
    else
        reduce_segments<false>(table, indices, offsets, per_sample_weights, out, bags, rows, dim, length, mode == HAL_BAG_MEAN, padding_idx);
}

template <typename T, typename I>
__global__ void HAL_LAUNCH_BOUNDS_MIN_BLOCKS(SPARSE_THREADS, SPARSE_MIN_BLOCKS) spmm_csr(const I* __restrict__ indptr, const I* __restrict__ indices, const T* __restrict__ values,
                                                           const T* __restrict__ dense, T* __restrict__ out, int m, int k, int n, long long nnz) {
    reduce_segments<false>(dense, indices, indptr, values, out, m, k, n, nnz, false, -1);
}
