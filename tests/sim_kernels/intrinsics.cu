// Every item of "What kernel code may use" (CUDA side), exercised once; tests check the results.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#ifdef HAL_SIM
#define HAL_DYNAMIC_SHARED(type, name) HAL_SIM_DYNAMIC_SHARED(type, name)
#else
#define HAL_DYNAMIC_SHARED(type, name) extern __shared__ type name[]
#endif

__device__ __forceinline__ float square(float v) { return v * v; }

// out[tid] for a block of any shape: lane results of each collective, written per thread.
template <class T>
__global__ void __launch_bounds__(1024) collectives(const float* __restrict__ x, float* __restrict__ out, unsigned* ballots, int* counters, int n) {
    HAL_DYNAMIC_SHARED(float, dyn);
    int tid = threadIdx.x + threadIdx.y * blockDim.x + threadIdx.z * blockDim.x * blockDim.y;
    int nthreads = blockDim.x * blockDim.y * blockDim.z;
    int gid = blockIdx.x * nthreads + tid;
    int lane = tid % warpSize;
    float v = gid < n ? x[gid] : 0.0f;
    dyn[tid] = v;
    __syncthreads();
    float from_next = dyn[(tid + 1) % nthreads];
    float xr = __shfl_xor_sync(0xffffffffu, v, 5);
    float idx = __shfl_sync(0xffffffffu, v, 3, 8);
    float dn = __shfl_down_sync(0xffffffffu, v, 2, 16);
    unsigned b = __ballot_sync(0xffffffffu, v > 0.0f);
    __syncwarp();
    T h = T(v);
    float back = float(h);
    if (gid < n) {
        out[gid * 6 + 0] = xr;
        out[gid * 6 + 1] = idx;
        out[gid * 6 + 2] = dn;
        out[gid * 6 + 3] = from_next;
        out[gid * 6 + 4] = back;
        out[gid * 6 + 5] = fmaxf(fminf(square(expf(logf(fabsf(v) + 1.0f))), INFINITY), rsqrtf(sqrtf(4.0f))) + tanhf(erff(__fdividef(v, 2.0f))) + __expf(0.0f);
        ballots[gid] = b;
    }
    if (lane == 0) atomicAdd(&counters[0], 1);
    atomicMax(&counters[1], gid);
    atomicAdd(reinterpret_cast<float*>(&counters[2]), 0.5f);
    (void)min(lane, 3); (void)max(1.0f, v); (void)make_float2(1, 2); (void)make_float4(1, 2, 3, 4); (void)make_uint2(1, 2); (void)make_uint4(1, 2, 3, 4);
    __half hh = __float2half_rn(v); (void)__half2float(hh);
    __nv_bfloat16 bb = __float2bfloat16_rn(v); (void)__bfloat162float(bb);
}
