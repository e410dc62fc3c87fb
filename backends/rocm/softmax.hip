// softmax over j of x[(o * n + j) * inner + i]; one block of 256 threads per (o, i).
//
// Two passes over the row: pass 1 keeps an online (max, sum of exp(x - max)) pair per thread
// and merges the pairs across the wave and the block; pass 2 writes exp(x - max) / sum.
// The merge is a pair reduction, so it is written out here instead of reusing block_sum.
#include "common.h"

// Merge (m2, s2) into (m, s): s is a sum of exp(v - m). A side that saw nothing or only -inf
// has m = -inf and s = 0, and must not produce exp(-inf - -inf) = NaN.
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
    const float mx = fmaxf(m, m2);
    if (mx == -INFINITY) return;
    s = (m == -INFINITY ? 0.0f : s * expf(m - mx)) + (m2 == -INFINITY ? 0.0f : s2 * expf(m2 - mx));
    m = mx;
}

template <typename T>
__global__ __launch_bounds__(256) void softmax(const T* __restrict__ x, T* __restrict__ y, int outer, int n, int inner) {
    __shared__ float scratch_m[HAL_MAX_WAVES];
    __shared__ float scratch_s[HAL_MAX_WAVES];
    if (inner <= 0) return;
    const int o = blockIdx.x / inner, i = blockIdx.x % inner;
    if (o >= outer) return;  // uniform per block: no barrier is skipped by part of it
    // With inner > 1 the row is strided by `inner`: consecutive lanes are `inner` elements
    // apart, so those loads do not coalesce; dim=-1 (inner = 1) is the layout that matters.
    const T* row = x + (long long)o * n * inner + i;
    T* out = y + (long long)o * n * inner + i;

    float m = -INFINITY, s = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float v = to_f32(row[(long long)j * inner]);
        if (v > m) {
            s = (m == -INFINITY ? 0.0f : s * expf(m - v)) + 1.0f;
            m = v;
        } else if (v != -INFINITY) {
            s += expf(v - m);
        }
    }

    // Wave: butterfly from warpSize / 2 (32 on CDNA, 16 on RDNA wave32).
    for (int off = warpSize / 2; off > 0; off >>= 1) {
        const float m2 = __shfl_xor(m, off), s2 = __shfl_xor(s, off);
        merge(m, s, m2, s2);
    }
    const int lane = threadIdx.x % warpSize, wave = threadIdx.x / warpSize, waves = blockDim.x / warpSize;
    if (lane == 0) {
        scratch_m[wave] = m;
        scratch_s[wave] = s;
    }
    __syncthreads();
    // Every wave merges the per-wave partials itself: no second barrier and broadcast.
    m = lane < waves ? scratch_m[lane] : -INFINITY;
    s = lane < waves ? scratch_s[lane] : 0.0f;
    for (int off = warpSize / 2; off > 0; off >>= 1) {
        const float m2 = __shfl_xor(m, off), s2 = __shfl_xor(s, off);
        merge(m, s, m2, s2);
    }

    const float inv = 1.0f / s;  // s >= 1 unless the whole row is -inf (then NaN, as the reference)
    for (int j = threadIdx.x; j < n; j += blockDim.x)
        out[(long long)j * inner] = from_f32<T>(expf(to_f32(row[(long long)j * inner]) - m) * inv);
}
