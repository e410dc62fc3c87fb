// Wave-level semantics of rocm-sim (waves of 64), checked by tests/test_sim_runtime.py.
#include <hip/hip_runtime.h>

// Each thread: xor / idx / down shuffle of its value (legacy forms), the same xor through the
// ROCm 6.2 form with a 64-bit mask, and the 64-bit ballot.
__global__ void shuffles(const float* x, float* out, unsigned long long* ballots, int lane_mask, int src, int delta, int width, float threshold) {
    int gid = blockIdx.x * blockDim.x + threadIdx.x;
    float v = x[gid];
    out[4 * gid + 0] = __shfl_xor(v, lane_mask, width);
    out[4 * gid + 1] = __shfl(v, src, width);
    out[4 * gid + 2] = __shfl_down(v, delta, width);
    out[4 * gid + 3] = __shfl_xor_sync(0xffffffffffffffffull, v, lane_mask, width);
    ballots[gid] = __ballot(v > threshold);
}

// A partial wave (block of 100 threads: lanes 36-63 of the second wave do not exist): the
// legacy forms work on the lanes that run.
__global__ void partial_wave(const float* x, float* out, unsigned long long* ballots) {
    int t = threadIdx.x;
    out[t] = __shfl_xor(x[t], 1);
    ballots[t] = __ballot(1);
}

__global__ void warp_size_seen(int* out) { out[threadIdx.x] = warpSize; }

#ifdef HAL_TEST_MASK
// Compiled only by the mask test: a 32-bit mask must not compile.
__global__ void narrow_mask(const float* x, float* out) {
    out[threadIdx.x] = __shfl_xor_sync(HAL_TEST_MASK, x[threadIdx.x], 1);
}
#endif

__global__ void split_deadlock(float* out) {
    float v = 1.0f;
    if (threadIdx.x % 64 < 32) v = __shfl_xor_sync(0xffffffffffffffffull, v, 1);
    __syncthreads();
    out[threadIdx.x] = v;
}
