// Every item of "What kernel code may use" (HIP side), exercised once; tests check the results.
#include <hip/hip_runtime.h>
#include <hip/hip_fp16.h>
#include <hip/hip_bfloat16.h>
#ifdef HAL_SIM
#define HAL_DYNAMIC_SHARED(type, name) HAL_SIM_DYNAMIC_SHARED(type, name)
#else
#define HAL_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

template <class T>
__global__ void __launch_bounds__(1024) collectives(const float* __restrict__ x, float* __restrict__ out, unsigned long long* ballots, int* counters, int n) {
    HAL_DYNAMIC_SHARED(float, dyn);
    int tid = threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y;
    int nthreads = blockDim.x * blockDim.y * blockDim.z;
    int gid = blockIdx.x * nthreads + tid;
    float v = gid < n ? x[gid] : 0.0f;
    dyn[tid] = v;
    __syncthreads();
    float from_next = dyn[(tid + 1) % nthreads];
    float xr = __shfl_xor(v, 37);
    float idx = __shfl(v, 3, 8);
    float dn = __shfl_down(v, 2, 16);
    unsigned long long b = __ballot(v > 0.0f);
    float xs = __shfl_xor_sync(0xffffffffffffffffull, v, 1);
    (void)__shfl_sync(0xffffffffffffffffull, v, 0);
    (void)__shfl_down_sync(0xffffffffffffffffull, v, 1);
    (void)__ballot_sync(0xffffffffffffffffull, 1);
    T h = T(v);
    float back = float(h);
    if (gid < n) {
        out[gid * 6 + 0] = xr;
        out[gid * 6 + 1] = idx;
        out[gid * 6 + 2] = dn;
        out[gid * 6 + 3] = from_next;
        out[gid * 6 + 4] = back;
        out[gid * 6 + 5] = xs;
        ballots[gid] = b;
    }
    if (tid % warpSize == 0) atomicAdd(&counters[0], 1);
    atomicMax(&counters[1], gid);
    __half hh = __float2half(v); (void)__half2float(hh);
    hip_bfloat16 bb(v); (void)float(bb);
}
