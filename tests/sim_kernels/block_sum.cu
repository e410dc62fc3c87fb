// A block reduction through shared memory, as the norm kernels do it: each block sums one row.
#include <cuda_runtime.h>

template <class T>
__global__ void __launch_bounds__(256) block_sum(const T* x, float* out, int rows, int n) {
    __shared__ float partial[256];
    int row = blockIdx.x;
    if (row >= rows) return;
    float acc = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc += float(x[(long long)row * n + i]);
    partial[threadIdx.x] = acc;
    __syncthreads();
    for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
        if ((int)threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[row] = partial[0];
}

template <class T>
__global__ void warp_sum(const T* x, float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    float v = i < n ? float(x[i]) : 0.0f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if ((threadIdx.x & 31) == 0) atomicAdd(out, v);
}
