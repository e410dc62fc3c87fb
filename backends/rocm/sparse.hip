// Sparse ops of recommendation models: embedding_bag<T, I> and spmm_csr<T, I>, written for AMD
// (wave64 CDNA, also correct on wave32 RDNA). Semantics in ops/sparse.py, ABI in
// docs/gpu-kernels.md. T is the element type, I the index type (int or long long) of the ids and
// of the offsets / indptr.
//
// Both are one gather-reduce: segment s (a bag, or a row of the CSR matrix) covers the entries
// [offsets[s], offsets[s + 1]); entry e adds w[e] * table[ids[e]] to output row s (or takes the
// max). spmm_csr is "sum" with the matrix values as weights and the dense matrix as the table.
//
// Work split for a 64-lane wave: a segment is served by a group of G lanes, G the smallest power
// of two with 8 * G >= D, at most warpSize (read at run time: 64 on CDNA, 32 on RDNA). Lane `sub`
// of a group owns the 8-element chunks sub, sub + G, ... of the output row, so on CDNA:
//   D = 64  -> G = 8,  8 bags per wave;      D = 128 -> G = 16, 4 bags per wave;
//   D = 512 -> G = 64, the whole wave;       larger D loops over 512-wide column slices.
// A wave64 would leave half its lanes idle on D = 128 with one bag per wave; packing bags keeps
// every lane loading. A chunk is one global_load_dwordx4 (16 bytes, two for float) when the rows
// are 16-byte aligned, else element by element. Every lane of a group reads the entry's id itself
// (the same address across the group: one memory transaction), so there are no cross-lane
// operations: groups of one wave may serve segments of different lengths, the wave simply runs
// until its longest segment is done. Four entries' rows are loaded before any is accumulated, so
// each lane has four independent loads outstanding (the gather is bound by memory latency, and a
// CU runs fewer waves than an SM runs warps). Groups stride over the segments, so any grid
// covers any number of segments.
//
// fp32 accumulation in VGPRs; ids outside [0, rows) and the padding id are skipped and offsets
// are clamped to [0, length], so nothing is read out of bounds even for invalid inputs.
#include "common.h"

#define SPARSE_THREADS 256  // 4 waves on CDNA
#define SPARSE_CHUNK 8      // elements per lane and row load: one dwordx4 of a 16-bit type
#define SPARSE_INFLIGHT 4

enum { SEGMENT_SUM = 0, SEGMENT_MEAN = 1, SEGMENT_MAX = 2 };

// Whether chunks of rows `row_elems` long starting at `base` are all 16-byte aligned.
template <typename T>
__device__ __forceinline__ bool rows_aligned(const T* base, int row_elems) {
    return (unsigned long long)row_elems * sizeof(T) % 16 == 0 && reinterpret_cast<unsigned long long>(base) % 16 == 0;
}

// The bits of an element, zero-extended, and back (little-endian: the low bytes of the word).
template <typename T>
__device__ __forceinline__ unsigned bits_of(T x) {
    unsigned bits = 0;
    __builtin_memcpy(&bits, &x, sizeof(T));
    return bits;
}

template <typename T>
__device__ __forceinline__ T of_bits(unsigned bits) {
    T x;
    __builtin_memcpy(&x, &bits, sizeof(T));
    return x;
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
    __device__ __forceinline__ float get(int i) const { return to_f32(of_bits<T>(w[i / PER_WORD] >> shift(i))); }
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
        for (int i = 0; i < SPARSE_CHUNK; ++i) c.put(i, from_f32<T>(v[i]));
#pragma unroll
        for (int q = 0; q < Chunk<T>::WORDS / 4; ++q)
            reinterpret_cast<uint4*>(p)[q] = make_uint4(c.w[4 * q], c.w[4 * q + 1], c.w[4 * q + 2], c.w[4 * q + 3]);
    } else {
#pragma unroll
        for (int i = 0; i < SPARSE_CHUNK; ++i)
            if (i < valid) p[i] = from_f32<T>(v[i]);
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
    const bool vec = rows_aligned(table, dim) && rows_aligned(out, dim);

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
                    w[u] = (!MAX && row[u] >= 0 && weights) ? to_f32(weights[e]) : 1.0f;
                    if (row[u] >= 0) load_chunk(v[u], table + (long long)row[u] * dim + col, valid, vec);
                }
#pragma unroll
                for (int u = 0; u < SPARSE_INFLIGHT; ++u) {
                    if (row[u] < 0) continue;
                    ++count;
#pragma unroll
                    for (int i = 0; i < SPARSE_CHUNK; ++i) {
                        const float x = v[u].get(i);
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
__global__ __launch_bounds__(SPARSE_THREADS) void embedding_bag(const T* __restrict__ table, const I* __restrict__ indices, const I* __restrict__ offsets,
                                                                const T* __restrict__ per_sample_weights, T* __restrict__ out, int bags, int rows,
                                                                int dim, long long length, int mode, int padding_idx) {
    if (mode == SEGMENT_MAX)
        reduce_segments<true>(table, indices, offsets, per_sample_weights, out, bags, rows, dim, length, false, padding_idx);
    else
        reduce_segments<false>(table, indices, offsets, per_sample_weights, out, bags, rows, dim, length, mode == SEGMENT_MEAN, padding_idx);
}

template <typename T, typename I>
__global__ __launch_bounds__(SPARSE_THREADS) void spmm_csr(const I* __restrict__ indptr, const I* __restrict__ indices, const T* __restrict__ values,
                                                           const T* __restrict__ dense, T* __restrict__ out, int m, int k, int n, long long nnz) {
    reduce_segments<false>(dense, indices, indptr, values, out, m, k, n, nnz, false, -1);
}
