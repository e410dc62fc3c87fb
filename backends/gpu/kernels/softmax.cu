// Written once for both vendors in CUDA's dialect; compiled as HIP for AMD through the vendor
// shim hal_vendor.h (docs/gpu-kernels.md).
// softmax over the middle axis of an [outer, n, inner] view: element (o, j, i) at
// (o * n + j) * inner + i, normalized over j.
//
// One block of 256 threads per (o, i) slice (grid = outer * inner); thread t takes j = t, t + 256,
// ... . For the usual last-axis softmax (inner = 1) a warp reads 32 consecutive elements; for
// inner > 1 the slice is strided by `inner` (correct, but not coalesced: such calls are rare).
//
// Slices up to SOFTMAX_CACHED * blockDim.x elements (4096) stay in registers: one read, one write
// per element, with a block max and a block sum in between. Longer slices use an online
// softmax (running max and rescaled running sum per thread) for a single reading pass, then a
// second pass that writes. exp is expf (not __expf): full fp32 accuracy for logits ~1e3.
#include "hal_gpu.h"

#define SOFTMAX_THREADS 256
#define SOFTMAX_CACHED 16  // floats per thread in registers: constant trip counts, fully unrolled

template <typename T>
__global__ void __launch_bounds__(SOFTMAX_THREADS)
softmax(const T* __restrict__ x, T* __restrict__ y, int outer, int n, int inner) {
    __shared__ float scratch[HAL_MAX_WARPS];
    const long long slice = blockIdx.x;
    if (slice >= (long long)outer * inner || n <= 0) return;  // uniform over the block
    const long long o = slice / inner, i = slice % inner;
    const long long stride = inner;
    x += o * n * stride + i;
    y += o * n * stride + i;

    if (n <= SOFTMAX_CACHED * (int)blockDim.x) {
        float v[SOFTMAX_CACHED];
        float m = -INFINITY;
        for (int k = 0; k < SOFTMAX_CACHED; ++k) {
            const int j = threadIdx.x + k * blockDim.x;
            v[k] = j < n ? to_float(x[j * stride]) : -INFINITY;
            m = fmaxf(m, v[k]);
        }
        m = block_max(m, scratch);
        float sum = 0.0f;
        for (int k = 0; k < SOFTMAX_CACHED; ++k) {
            const int j = threadIdx.x + k * blockDim.x;
            v[k] = j < n ? expf(v[k] - m) : 0.0f;
            sum += v[k];
        }
        const float inv = 1.0f / block_sum(sum, scratch);
        for (int k = 0; k < SOFTMAX_CACHED; ++k) {
            const int j = threadIdx.x + k * blockDim.x;
            if (j < n) y[j * stride] = from_float<T>(v[k] * inv);
        }
        return;
    }

    // Long slices: online max/sum. A thread that has only seen -inf keeps m = -inf and sum = 0;
    // the guards keep exp(-inf - -inf) = NaN out of it (masked attention rows).
    float m = -INFINITY, sum = 0.0f;
    for (int j = threadIdx.x; j < n; j += blockDim.x) {
        const float v = to_float(x[j * stride]);
        if (v > m) {
            sum = sum * expf(m - v) + 1.0f;  // expf(-inf) = 0 on the first finite value
            m = v;
        } else if (m != -INFINITY) {
            sum += expf(v - m);
        } else if (v != v) {
            sum = v;  // NaN input: propagate
        }
    }
    const float row_max = block_max(m, scratch);
    const float scaled = m == -INFINITY ? 0.0f : sum * expf(m - row_max);
    const float inv = 1.0f / block_sum(scaled, scratch);
    for (int j = threadIdx.x; j < n; j += blockDim.x) y[j * stride] = from_float<T>(expf(to_float(x[j * stride]) - row_max) * inv);
}
