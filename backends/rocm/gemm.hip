// Vendor file: AMD's matrix cores change the algorithm (gemm_mfma: wave64 v_mfma_f32_32x32x8
// fragments and their lane layouts set the LDS layout and a 4-wave, 256-thread block).
// gemm with a fused epilogue: out = act(alpha * (a @ b) + bias) + beta * c.
// a [M, K], b [K, N] of type T; c, out [M, N] of type To; bias [N] fp32; fp32 accumulation.
// Every block covers a 64 x 64 tile of out: grid (ceil(N / 64), ceil(M / 64)), block 256.
//
//   gemm_simt<T, To>  every dtype, every target: LDS-tiled, 4 x 4 outputs per thread.
//   gemm_mfma<T, To>  T = __half / hip_bfloat16 on gfx90a / gfx94x: 4 waves, each one 32 x 32
//                     tile through v_mfma_f32_32x32x8{f16,bf16_1k}.
//
// Both kernels stage one K-slice of A and B in LDS per iteration and prefetch the next slice
// from global memory into registers while the current one is multiplied, so a single LDS
// buffer is enough to overlap loads with math. Out-of-range rows, columns and K are zero-filled
// on load and skipped on store, so any M, N, K works (K = 0 gives act(bias) + beta * c).
//
// LDS budget: 64 KiB per workgroup on gfx90a / gfx94x / RDNA. The tiles below use ~8-9 KiB,
// so LDS never limits occupancy here (VGPRs do). On gfx950 (160 KiB) the 64 x 64 tile of the
// ABI would stay the same; the K-slice could deepen (MFMA_BK 128, or a 3-stage LDS ring) to
// cut barriers per FLOP, which is the only tile choice its larger LDS would change.
#include "hal_gpu.h"

#define GEMM_TILE 64

// Shared epilogue: one output element from its fp32 accumulator.
template <typename To>
__device__ __forceinline__ void epilogue(float acc, const float* __restrict__ bias, const To* __restrict__ c, To* __restrict__ out,
                                         int m, int n, int N, float alpha, float beta, int activation) {
    float v = alpha * acc;
    if (bias) v += bias[n];
    v = activate(v, activation);
    const long long at = (long long)m * N + n;
    if (c) v += beta * to_float(c[at]);
    out[at] = from_float<To>(v);
}

// ====================================================================== SIMT
// 256 threads as a 16 x 16 grid; thread (ty, tx) owns rows 4ty..4ty+3 and columns 4tx..4tx+3.
// LDS holds fp32 (converted once at load): A k-major (transposed) so a thread's 4 rows are one
// 16-byte ds_read_b128, B as is so its 4 columns are one too. Per K step a wave reads 4
// distinct float4 of A (ty is constant over 16 lanes: broadcast) and 16 consecutive float4 of
// B: no bank conflicts. The A row is padded by one float4 so that the transposing stores
// (16 lanes of different k, same m) spread over banks 4k + m instead of all hitting bank m.
#define SIMT_BK 16

template <typename T, typename To>
__global__ __launch_bounds__(256) void gemm_simt(const T* __restrict__ a, const T* __restrict__ b, const float* __restrict__ bias,
                                                 const To* __restrict__ c, To* __restrict__ out, int M, int N, int K, float alpha,
                                                 float beta, int activation) {
    __shared__ float4 As[SIMT_BK][GEMM_TILE / 4 + 1];  // [k][m / 4], 4352 B
    __shared__ float4 Bs[SIMT_BK][GEMM_TILE / 4];      // [k][n / 4], 4096 B

    const int tid = threadIdx.x, tx = tid % 16, ty = tid / 16;
    const int m0 = blockIdx.y * GEMM_TILE, n0 = blockIdx.x * GEMM_TILE;

    // Global -> register loaders, coalesced: A along k (16 lanes cover one row's 16 k),
    // B along n (64 lanes cover one k row's 64 n).
    const int a_k = tid % SIMT_BK, a_m = tid / SIMT_BK;  // rows a_m + 16 r
    const int b_n = tid % GEMM_TILE, b_k = tid / GEMM_TILE;  // k rows b_k + 4 r
    float ra[4], rb[4];

    auto fetch = [&](int k0) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const int m = m0 + a_m + 16 * r, ka = k0 + a_k;
            ra[r] = (m < M && ka < K) ? to_float(a[(long long)m * K + ka]) : 0.0f;
            const int kb = k0 + b_k + 4 * r, n = n0 + b_n;
            rb[r] = (kb < K && n < N) ? to_float(b[(long long)kb * N + n]) : 0.0f;
        }
    };

    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

    fetch(0);
    for (int k0 = 0; k0 < K; k0 += SIMT_BK) {
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            reinterpret_cast<float*>(As[a_k])[a_m + 16 * r] = ra[r];
            reinterpret_cast<float*>(Bs[b_k + 4 * r])[b_n] = rb[r];
        }
        __syncthreads();
        if (k0 + SIMT_BK < K) fetch(k0 + SIMT_BK);  // in flight during the math below
#pragma unroll
        for (int kk = 0; kk < SIMT_BK; ++kk) {
            const float4 av = As[kk][ty], bv = Bs[kk][tx];
            const float am[4] = {av.x, av.y, av.z, av.w}, bn[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] += am[i] * bn[j];
        }
        __syncthreads();  // the next iteration overwrites the tiles
    }

#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + 4 * ty + i;
        if (m >= M) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int n = n0 + 4 * tx + j;
            if (n < N) epilogue(acc[i][j], bias, c, out, m, n, N, alpha, beta, activation);
        }
    }
}

// ====================================================================== MFMA
// 256 threads = 4 waves of 64 (MFMA exists only on wave64 CDNA, so 64 is a constant here);
// wave w computes rows 32 (w / 2) .. +31 and columns 32 (w % 2) .. +31 of the block tile with
// one 32x32 fp32 accumulator: 16 floats per lane (AGPRs on gfx90a, unified file on gfx94x).
//
// Per MFMA a lane needs 4 consecutive k of one row of A and 4 consecutive k of one column of
// B, so both tiles are stored k-contiguous in LDS: As[m][k] as in memory, Bs[n][k] transposed
// while staging (the transpose happens in registers: a thread loads 8 k of one column, with
// the 64 lanes of a wave covering 64 consecutive n, i.e. coalesced). One K-slice is 32 deep.
// Row stride 32 + 4 halves = 72 B = 18 banks: the 8-byte reads of 16 lanes (rows r..r+15)
// start on 16 distinct even banks, so each ds_read_b64 quarter-wave is conflict-free; an
// unpadded 64 B stride would put every other row on the same banks.
#define MFMA_BK 32
#define MFMA_LDS_ROW (MFMA_BK + 4)  // halves per LDS row

template <typename T, typename To>
__global__ __launch_bounds__(256) void gemm_mfma(const T* __restrict__ a, const T* __restrict__ b, const float* __restrict__ bias,
                                                 const To* __restrict__ c, To* __restrict__ out, int M, int N, int K, float alpha,
                                                 float beta, int activation) {
    // uint2 storage gives the tiles 8-byte alignment, so 4-half groups load as ds_read_b64.
    __shared__ uint2 As_raw[GEMM_TILE * MFMA_LDS_ROW / 4];  // [m][k], 4608 B
    __shared__ uint2 Bs_raw[GEMM_TILE * MFMA_LDS_ROW / 4];  // [n][k], 4608 B
    T* As = reinterpret_cast<T*>(As_raw);
    T* Bs = reinterpret_cast<T*>(Bs_raw);

    const int tid = threadIdx.x, lane = tid % 64, wave = tid / 64;
    const int m0 = blockIdx.y * GEMM_TILE, n0 = blockIdx.x * GEMM_TILE;
    const int wm = (wave / 2) * 32, wn = (wave % 2) * 32;

    // Staging: A row tid / 4, 8 consecutive k from (tid % 4) * 8; B column tid % 64, 8 k from
    // (tid / 64) * 8. 64 x 32 halves per tile = 8 per thread.
    const int a_m = tid / 4, a_k = (tid % 4) * 8;
    const int b_n = tid % 64, b_k = (tid / 64) * 8;
    T ra[8], rb[8];
    const T zero = from_float<T>(0.0f);

    // A's 8 halves are contiguous: one 16-byte global_load_dwordx4 when the row start and
    // the chunk are 16-byte aligned (K % 8 == 0, aligned base) and the chunk is in range.
    const bool a_vec = K % 8 == 0 && (reinterpret_cast<unsigned long long>(a) & 15) == 0;

    auto fetch = [&](int k0) {
        const int m = m0 + a_m, n = n0 + b_n;
        if (a_vec && m < M && k0 + a_k + 8 <= K) {
            const T* src = static_cast<const T*>(__builtin_assume_aligned(a + (long long)m * K + k0 + a_k, 16));
#pragma unroll
            for (int e = 0; e < 8; ++e) ra[e] = src[e];
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                const int ka = k0 + a_k + e;
                ra[e] = (m < M && ka < K) ? a[(long long)m * K + ka] : zero;
            }
        }
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const int kb = k0 + b_k + e;
            rb[e] = (n < N && kb < K) ? b[(long long)kb * N + n] : zero;
        }
    };

    float acc[16];
#pragma unroll
    for (int r = 0; r < 16; ++r) acc[r] = 0.0f;

    fetch(0);
    for (int k0 = 0; k0 < K; k0 += MFMA_BK) {
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            As[a_m * MFMA_LDS_ROW + a_k + e] = ra[e];
            Bs[b_n * MFMA_LDS_ROW + b_k + e] = rb[e];
        }
        __syncthreads();
        if (k0 + MFMA_BK < K) fetch(k0 + MFMA_BK);  // global loads overlap the MFMAs
#pragma unroll
        for (int kk = 0; kk < MFMA_BK; kk += 8) {
            // A: row = lane % 32, k = 4 (lane / 32) + r; B: col = lane % 32, same k.
            const int k = kk + 4 * (lane / 32);
            const T* ap = As + (wm + lane % 32) * MFMA_LDS_ROW + k;
            const T* bp = Bs + (wn + lane % 32) * MFMA_LDS_ROW + k;
            T af[4], bf[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) {
                af[r] = ap[r];
                bf[r] = bp[r];
            }
            mfma_32x32x8(acc, af, bf, acc);  // d may alias c: the wrappers read c first
        }
        __syncthreads();
    }

    // D: col = lane % 32, row = 8 (r / 4) + 4 (lane / 32) + r % 4. For a fixed r the 32 lanes
    // of a half-wave store 32 consecutive columns of one row.
    const int n = n0 + wn + lane % 32;
    if (n >= N) return;
#pragma unroll
    for (int r = 0; r < 16; ++r) {
        const int m = m0 + wm + 8 * (r / 4) + 4 * (lane / 32) + r % 4;
        if (m < M) epilogue(acc[r], bias, c, out, m, n, N, alpha, beta, activation);
    }
}
