// Conversions and matrix-unit layouts of cuda-sim, checked by tests/test_sim_numerics.py.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <hal_sim/mma.h>  // this test file is for the emulator only

// float -> half and bfloat16 bits through the device intrinsics (grid-stride loop).
__global__ void encode(const float* x, unsigned short* h, unsigned short* b, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        __half hv = __float2half_rn(x[i]);
        __nv_bfloat16 bv = __float2bfloat16_rn(x[i]);
        memcpy(&h[i], &hv, 2);
        memcpy(&b[i], &bv, 2);
    }
}

__global__ void decode(const __half* h, const __nv_bfloat16* b, float* fh, float* fb, int n) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        fh[i] = __half2float(h[i]);
        fb[i] = __bfloat162float(b[i]);
    }
}

// fp8 helpers (for later issues): per element 8 codes: e4m3fn, e5m2, e4m3fnuz, e5m2fnuz, each
// saturating then not.
__global__ void encode_fp8(const float* x, unsigned char* out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float v = x[i];
        unsigned char* o = out + 8 * i;
        o[0] = hal_sim::f32_to_e4m3fn(v, true);   o[1] = hal_sim::f32_to_e4m3fn(v, false);
        o[2] = hal_sim::f32_to_e5m2(v, true);     o[3] = hal_sim::f32_to_e5m2(v, false);
        o[4] = hal_sim::f32_to_e4m3fnuz(v, true); o[5] = hal_sim::f32_to_e4m3fnuz(v, false);
        o[6] = hal_sim::f32_to_e5m2fnuz(v, true); o[7] = hal_sim::f32_to_e5m2fnuz(v, false);
    }
}

__global__ void decode_fp8(float* out) {  // 256 codes x 4 formats
    int c = threadIdx.x;
    out[4 * c + 0] = hal_sim::e4m3fn_to_f32(c);
    out[4 * c + 1] = hal_sim::e5m2_to_f32(c);
    out[4 * c + 2] = hal_sim::e4m3fnuz_to_f32(c);
    out[4 * c + 3] = hal_sim::e5m2fnuz_to_f32(c);
}

// The emulator's index maps, dumped: per lane and element (row, col) of A, B, C/D.
__global__ void mma_layout_dump(int* a, int* b, int* cd) {
    int lane = threadIdx.x;
    for (int i = 0; i < 8; ++i) { auto p = hal_sim::mma_layout::m16n8k16_a(lane, i); a[(lane * 8 + i) * 2] = p.row; a[(lane * 8 + i) * 2 + 1] = p.col; }
    for (int i = 0; i < 4; ++i) { auto p = hal_sim::mma_layout::m16n8k16_b(lane, i); b[(lane * 4 + i) * 2] = p.row; b[(lane * 4 + i) * 2 + 1] = p.col; }
    for (int i = 0; i < 4; ++i) { auto p = hal_sim::mma_layout::m16n8k16_cd(lane, i); cd[(lane * 4 + i) * 2] = p.row; cd[(lane * 4 + i) * 2 + 1] = p.col; }
}

// One warp computes D = A*B + C through the wrapper; each lane builds its fragments from the
// row-major A [16x16], B [16x8], C [16x8] with the layout tables the test passes in (Python
// computes them from the formulas of docs/hardware.md), so the wrapper is checked against them.
template <class T>
__global__ void mma_tile(const T* a, const T* b, const float* c, float* d, const int* la, const int* lb, const int* lcd) {
    int lane = threadIdx.x;
    unsigned ra[4] = {0, 0, 0, 0}, rb[2] = {0, 0};
    float rc[4], rd[4];
    for (int i = 0; i < 8; ++i) {
        T v = a[la[(lane * 8 + i) * 2] * 16 + la[(lane * 8 + i) * 2 + 1]];
        unsigned short s;
        memcpy(&s, &v, 2);
        ra[i >> 1] |= unsigned(s) << (16 * (i & 1));
    }
    for (int i = 0; i < 4; ++i) {
        T v = b[lb[(lane * 4 + i) * 2] * 8 + lb[(lane * 4 + i) * 2 + 1]];
        unsigned short s;
        memcpy(&s, &v, 2);
        rb[i >> 1] |= unsigned(s) << (16 * (i & 1));
    }
    for (int i = 0; i < 4; ++i) rc[i] = c[lcd[(lane * 4 + i) * 2] * 8 + lcd[(lane * 4 + i) * 2 + 1]];
    if constexpr (std::is_same_v<T, __half>) mma_m16n8k16_f16(rd, ra, rb, rc);
    else mma_m16n8k16_bf16(rd, ra, rb, rc);
    for (int i = 0; i < 4; ++i) d[lcd[(lane * 4 + i) * 2] * 8 + lcd[(lane * 4 + i) * 2 + 1]] = rd[i];
}
