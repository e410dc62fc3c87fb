// Conversions and matrix-unit layouts of rocm-sim, checked by tests/test_sim_numerics.py.
#include <hip/hip_runtime.h>
#include <hip/hip_fp16.h>
#include <hip/hip_bfloat16.h>
#include <hal_sim/mma.h>  // this test file is for the emulator only

__global__ void encode(const float* x, unsigned short* h, unsigned short* b, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        __half hv = __float2half(x[i]);
        hip_bfloat16 bv(x[i]);
        memcpy(&h[i], &hv, 2);
        memcpy(&b[i], &bv, 2);
    }
}

__global__ void decode(const __half* h, const hip_bfloat16* b, float* fh, float* fb, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        fh[i] = __half2float(h[i]);
        fb[i] = float(b[i]);
    }
}

__global__ void mfma_layout_dump(int* a, int* b, int* cd) {
    int lane = threadIdx.x;
    for (int r = 0; r < 4; ++r) { auto p = hal_sim::mma_layout::mfma32x32x8_a(lane, r); a[(lane * 4 + r) * 2] = p.row; a[(lane * 4 + r) * 2 + 1] = p.col; }
    for (int r = 0; r < 4; ++r) { auto p = hal_sim::mma_layout::mfma32x32x8_b(lane, r); b[(lane * 4 + r) * 2] = p.row; b[(lane * 4 + r) * 2 + 1] = p.col; }
    for (int r = 0; r < 16; ++r) { auto p = hal_sim::mma_layout::mfma32x32x8_cd(lane, r); cd[(lane * 16 + r) * 2] = p.row; cd[(lane * 16 + r) * 2 + 1] = p.col; }
}

// One wave computes D = A*B + C (A [32x8], B [8x32], C, D [32x32]) with fragments built from the
// layout tables the test passes in.
template <class T>
__global__ void mfma_tile(const T* a, const T* b, const float* c, float* d, const int* la, const int* lb, const int* lcd) {
    int lane = threadIdx.x;
    T ra[4], rb[4];
    float rc[16], rd[16];
    for (int r = 0; r < 4; ++r) {
        ra[r] = a[la[(lane * 4 + r) * 2] * 8 + la[(lane * 4 + r) * 2 + 1]];
        rb[r] = b[lb[(lane * 4 + r) * 2] * 32 + lb[(lane * 4 + r) * 2 + 1]];
    }
    for (int r = 0; r < 16; ++r) rc[r] = c[lcd[(lane * 16 + r) * 2] * 32 + lcd[(lane * 16 + r) * 2 + 1]];
    if constexpr (std::is_same_v<T, __half>) mfma_f32_32x32x8_f16(rd, ra, rb, rc);
    else mfma_f32_32x32x8_bf16(rd, ra, rb, rc);
    for (int r = 0; r < 16; ++r) d[lcd[(lane * 16 + r) * 2] * 32 + lcd[(lane * 16 + r) * 2 + 1]] = rd[r];
}
