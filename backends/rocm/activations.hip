// silu_and_mul (SwiGLU): out[r, i] = silu(x[r, i]) * x[r, d + i], x is [rows, 2d].
// One block of 256 threads per row, purely elementwise and memory bound: consecutive lanes
// touch consecutive elements, so each wave64 reads 128 B (fp16) or 256 B (fp32) per half row.
#include "common.h"

template <typename T>
__global__ __launch_bounds__(256) void silu_and_mul(const T* __restrict__ x, T* __restrict__ out, int rows, int d) {
    const int row = blockIdx.x;
    if (row >= rows) return;
    const T* gate = x + (long long)row * 2 * d;
    const T* up = gate + d;
    T* o = out + (long long)row * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x)
        o[i] = from_f32<T>(silu_f32(to_f32(gate[i])) * to_f32(up[i]));
}
