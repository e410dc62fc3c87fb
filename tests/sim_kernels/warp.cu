// Warp-level semantics of cuda-sim (warps of 32), checked by tests/test_sim_runtime.py.
#include <cuda_runtime.h>

// Every thread records what it sees of the launch geometry (12 values).
__global__ void geometry(unsigned* out) {
    unsigned block = blockIdx.x + gridDim.x * (blockIdx.y + gridDim.y * blockIdx.z);
    unsigned threads = blockDim.x * blockDim.y * blockDim.z;
    unsigned tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
    unsigned* o = out + 12ull * (block * threads + tid);
    o[0] = threadIdx.x; o[1] = threadIdx.y; o[2] = threadIdx.z;
    o[3] = blockIdx.x; o[4] = blockIdx.y; o[5] = blockIdx.z;
    o[6] = blockDim.x; o[7] = blockDim.y; o[8] = blockDim.z;
    o[9] = gridDim.x; o[10] = gridDim.y; o[11] = gridDim.z;
}

// Each thread: xor / idx / down shuffle of its value, and the ballot of (x > threshold).
__global__ void shuffles(const float* x, float* out, unsigned* ballots, int lane_mask, int src, int delta, int width, float threshold) {
    int gid = blockIdx.x * blockDim.x + threadIdx.x;
    float v = x[gid];
    out[3 * gid + 0] = __shfl_xor_sync(0xffffffffu, v, lane_mask, width);
    out[3 * gid + 1] = __shfl_sync(0xffffffffu, v, src, width);
    out[3 * gid + 2] = __shfl_down_sync(0xffffffffu, v, delta, width);
    ballots[gid] = __ballot_sync(0xffffffffu, v > threshold);
    __syncwarp();
}

// Two half-warps shuffling independently with disjoint masks (legal since Volta).
__global__ void half_warps(const float* x, float* out) {
    int gid = blockIdx.x * blockDim.x + threadIdx.x, lane = threadIdx.x % 32;
    unsigned mask = lane < 16 ? 0x0000ffffu : 0xffff0000u;
    out[gid] = __shfl_xor_sync(mask, x[gid], 1);
}

// Shared memory per block: every block fills the same __shared__ array with its own id, and
// after several barriers (while other blocks run on other workers) still reads only its own.
__global__ void shared_isolation(const float* x, float* out, int rounds) {
    __shared__ float tile[128];
    __shared__ int owner[128];
    int t = threadIdx.x, b = blockIdx.x;
    float acc = 0.0f;
    int bad = 0;
    for (int r = 0; r < rounds; ++r) {
        tile[t] = x[b * blockDim.x + t] + r;
        owner[t] = b;
        __syncthreads();
        int other = (t * 7 + r) % blockDim.x;
        acc += tile[other];
        bad += owner[other] != b;
        __syncthreads();
    }
    out[2 * (b * blockDim.x + t)] = acc;
    out[2 * (b * blockDim.x + t) + 1] = float(bad);
}

// Dynamic shared memory through the emulator's macro: a per-block buffer of shared_bytes.
__global__ void dynamic_shared(const float* x, float* out) {
    HAL_SIM_DYNAMIC_SHARED(float, buf);
    int t = threadIdx.x, n = blockDim.x, b = blockIdx.x;
    buf[t] = x[b * n + t];
    buf[n + t] = float(b);
    __syncthreads();
    out[b * n + t] = buf[n - 1 - t] + buf[n + (t + 1) % n];
}

// Atomics under contention: every thread of every block hits the same three words.
__global__ void contention(int* counter, float* sum, int* maximum, const int* values) {
    int gid = blockIdx.x * blockDim.x + threadIdx.x;
    for (int i = 0; i < 8; ++i) {
        atomicAdd(counter, 1);
        atomicAdd(sum, 0.25f);
    }
    atomicMax(maximum, values[gid]);
}

// A block-wide reduction with several barriers per block (the timing test).
__global__ void reduce_rows(const float* x, float* out, int n) {
    __shared__ float partial[256];
    const float* row = x + (long long)blockIdx.x * n;
    float acc = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc += row[i];
    partial[threadIdx.x] = acc;
    __syncthreads();
    for (int s = blockDim.x / 2; s > 0; s >>= 1) {
        if ((int)threadIdx.x < s) partial[threadIdx.x] += partial[threadIdx.x + s];
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = partial[0];
}

// ---- misuse the emulator must report instead of hanging -------------------------------------

__global__ void early_exit(float* out) {
    if (threadIdx.x == 5) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}

__global__ void exit_before_shuffle(float* out) {
    if (threadIdx.x % 32 == 3) return;
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, 1.0f, 1);
}

__global__ void split_deadlock(float* out) {
    float v = 1.0f;
    if (threadIdx.x % 32 < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);  // waits for lanes 16-31 ...
    __syncthreads();                                                    // ... which wait here
    out[threadIdx.x] = v;
}

__global__ void caller_not_in_mask(float* out) {
    out[threadIdx.x] = __shfl_xor_sync(0x0000ffffu, 1.0f, 1);
}

