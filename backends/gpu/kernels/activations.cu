// Written once for both vendors in CUDA's dialect; compiled as HIP for AMD through the vendor
// shim hal_vendor.h (docs/gpu-kernels.md).
// The gated elementwise ops "<act>_and_mul" (silu_and_mul is SwiGLU, gelu_tanh_and_mul GeGLU):
// out[r, j] = act(x[r, j]) * x[r, d + j] for x of shape [rows, 2d], act a HAL_ACT_* code.
//
// One block of 256 threads per row (grid = rows); each thread strides the row by blockDim.x, so a
// warp reads 32 consecutive gate elements and 32 consecutive up elements (two coalesced streams)
// and writes 32 consecutive outputs. Pure bandwidth: no shared memory, no reduction.
#include "hal_gpu.h"

#define ACTIVATION_THREADS 256

template <typename T>
__global__ void __launch_bounds__(ACTIVATION_THREADS)
gated_and_mul(const T* __restrict__ x, T* __restrict__ out, int rows, int d, int activation) {
    const int row = blockIdx.x;
    if (row >= rows) return;
    const T* gate = x + (long long)row * 2 * d;
    const T* up = gate + d;
    out += (long long)row * d;
    for (int j = threadIdx.x; j < d; j += blockDim.x) out[j] = from_float<T>(activate(to_float(gate[j]), activation) * to_float(up[j]));
}
