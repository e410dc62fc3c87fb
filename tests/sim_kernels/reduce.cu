// Planted-bug kernels for the sanitizer tests. Built as is they are correct; with
// -DHAL_PLANT_RACE one barrier of the shared-memory reduction is gone (a data race on shared
// memory that ThreadSanitizer must report at the line below), and with -DHAL_PLANT_OOB the
// copy kernel stores one element past the end of its output (AddressSanitizer must report it).
#include <cuda_runtime.h>

// Sum of each row, through shared memory (the tree of the norm kernels).
__global__ void __launch_bounds__(256) row_sum(const float* x, float* out, int rows, int n) {
    __shared__ float partial[256];
    int row = blockIdx.x;
    float acc = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc += x[(long long)row * n + i];
    partial[threadIdx.x] = acc;  // HAL_RACE_WRITE
#ifndef HAL_PLANT_RACE
    __syncthreads();
#endif
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if ((int)threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];  // HAL_RACE_READ
        __syncthreads();
    }
    if (threadIdx.x == 0) out[row] = partial[0];
}

// y = 2 * x, one element per thread, bounds-checked (or one past the end, planted).
__global__ void scale_copy(const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
#ifdef HAL_PLANT_OOB
    if (i <= n) y[i] = 2.0f * (i < n ? x[i] : 0.0f);  // HAL_OOB_LINE
#else
    if (i < n) y[i] = 2.0f * x[i];
#endif
}

// A per-thread array on the fiber stack, over many blocks: each worker reuses its fiber stacks
// block after block (the ASan mode must not see stale stack poison there).
__global__ void local_softmax(const float* x, float* y, int n) {
    float v[16];
    float m = -INFINITY, sum = 0.0f;
    const float* row = x + (long long)blockIdx.x * n;
    for (int k = 0; k < 16; ++k) {
        int j = threadIdx.x + k * blockDim.x;
        v[k] = j < n ? row[j] : -INFINITY;
        m = fmaxf(m, v[k]);
    }
    for (int k = 0; k < 16; ++k) sum += v[k] == -INFINITY ? 0.0f : expf(v[k] - m);
    for (int k = 0; k < 16; ++k) {
        int j = threadIdx.x + k * blockDim.x;
        if (j < n) y[(long long)blockIdx.x * n + j] = expf(v[k] - m) / sum;
    }
}
