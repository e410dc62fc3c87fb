// hal_sim/mma.h: the matrix wrappers of docs/gpu-kernels.md, emulated as warp collectives with the
// ISA lane layouts of gpu-facts.md. The lane that completes the collective gathers every lane's
// fragments into whole A, B, C matrices, computes D = A*B + C in fp32 (each product of two half or
// bfloat16 values is exact in fp32; the sum runs over k in order, then C is added), and scatters D.
// The index maps are exposed (hal_sim::mma_layout) so that tests check them against the formulas.
#pragma once
#include "hal_sim/runtime.h"
#include "hal_sim/half.h"

namespace hal_sim::mma_layout {
// NVIDIA mma.sync.m16n8k16.row.col: g = lane >> 2, t = lane & 3; i = element index in the lane,
// registers in order, low half of each 32-bit register first.
struct RC { int row, col; };
inline RC m16n8k16_a(int lane, int i) { int g = lane >> 2, t = lane & 3; return {g + 8 * ((i >> 1) & 1), 2 * t + (i & 1) + 8 * (i >> 2)}; }
inline RC m16n8k16_b(int lane, int i) { int g = lane >> 2, t = lane & 3; return {2 * t + (i & 1) + 8 * (i >> 1), g}; }
inline RC m16n8k16_cd(int lane, int i) { int g = lane >> 2, t = lane & 3; return {g + 8 * (i >> 1), 2 * t + (i & 1)}; }
// AMD v_mfma_f32_32x32x8{f16,bf16_1k}, wave64; r = element index in the lane.
inline RC mfma32x32x8_a(int lane, int r) { return {lane % 32, 4 * (lane / 32) + r}; }   // A[row][k]
inline RC mfma32x32x8_b(int lane, int r) { return {4 * (lane / 32) + r, lane % 32}; }   // B[k][col]
inline RC mfma32x32x8_cd(int lane, int r) { return {8 * (r / 4) + 4 * (lane / 32) + r % 4, lane % 32}; }
}  // namespace hal_sim::mma_layout

#if HAL_SIM_WARP == 32
#include "cuda_fp16.h"
#include "cuda_bf16.h"

namespace hal_sim {
struct MmaSlot { float* d; const unsigned* a; const unsigned* b; const float* c; };

template <float (*Widen)(uint16_t)>
void mma_m16n8k16_compute(void* const* payloads, uint64_t) {
    float A[16][16], B[16][8], C[16][8];
    for (int lane = 0; lane < 32; ++lane) {
        auto* s = static_cast<MmaSlot*>(payloads[lane]);
        for (int i = 0; i < 8; ++i) {
            auto p = mma_layout::m16n8k16_a(lane, i);
            A[p.row][p.col] = Widen(uint16_t(s->a[i >> 1] >> (16 * (i & 1))));
        }
        for (int i = 0; i < 4; ++i) {
            auto p = mma_layout::m16n8k16_b(lane, i);
            B[p.row][p.col] = Widen(uint16_t(s->b[i >> 1] >> (16 * (i & 1))));
        }
        for (int i = 0; i < 4; ++i) {
            auto p = mma_layout::m16n8k16_cd(lane, i);
            C[p.row][p.col] = s->c[i];
        }
    }
    // d may alias c: everything is gathered before anything is scattered.
    for (int lane = 0; lane < 32; ++lane) {
        auto* s = static_cast<MmaSlot*>(payloads[lane]);
        for (int i = 0; i < 4; ++i) {
            auto p = mma_layout::m16n8k16_cd(lane, i);
            float acc = 0.0f;
            for (int k = 0; k < 16; ++k) acc += A[p.row][k] * B[k][p.col];
            s->d[i] = acc + C[p.row][p.col];
        }
    }
}
}  // namespace hal_sim

// Warp-collective over all 32 lanes (mma.sync.aligned: every lane must execute it).
__device__ inline void mma_m16n8k16_f16(float d[4], const unsigned a[4], const unsigned b[2], const float c[4],
                                        const std::source_location& loc = std::source_location::current()) {
    ::hal_sim::MmaSlot slot{d, a, b, c};
    ::hal_sim::collective(0xFFFFFFFFull, 0, "mma_m16n8k16_f16", &::hal_sim::mma_m16n8k16_compute<::hal_sim::f16_bits_to_f32>, &slot, loc);
}
__device__ inline void mma_m16n8k16_bf16(float d[4], const unsigned a[4], const unsigned b[2], const float c[4],
                                         const std::source_location& loc = std::source_location::current()) {
    ::hal_sim::MmaSlot slot{d, a, b, c};
    ::hal_sim::collective(0xFFFFFFFFull, 0, "mma_m16n8k16_bf16", &::hal_sim::mma_m16n8k16_compute<::hal_sim::bf16_bits_to_f32>, &slot, loc);
}

#else  // HAL_SIM_WARP == 64
#include "hip/hip_fp16.h"
#include "hip/hip_bfloat16.h"

namespace hal_sim {
template <class T>
struct MfmaSlot { float* d; const T* a; const T* b; const float* c; };

template <class T>
void mfma_32x32x8_compute(void* const* payloads, uint64_t) {
    float A[32][8], B[8][32], C[32][32];
    for (int lane = 0; lane < 64; ++lane) {
        auto* s = static_cast<MfmaSlot<T>*>(payloads[lane]);
        for (int r = 0; r < 4; ++r) {
            auto p = mma_layout::mfma32x32x8_a(lane, r);
            A[p.row][p.col] = float(s->a[r]);
            auto q = mma_layout::mfma32x32x8_b(lane, r);
            B[q.row][q.col] = float(s->b[r]);
        }
        for (int r = 0; r < 16; ++r) {
            auto p = mma_layout::mfma32x32x8_cd(lane, r);
            C[p.row][p.col] = s->c[r];
        }
    }
    for (int lane = 0; lane < 64; ++lane) {
        auto* s = static_cast<MfmaSlot<T>*>(payloads[lane]);
        for (int r = 0; r < 16; ++r) {
            auto p = mma_layout::mfma32x32x8_cd(lane, r);
            float acc = 0.0f;
            for (int k = 0; k < 8; ++k) acc += A[p.row][k] * B[k][p.col];
            s->d[r] = acc + C[p.row][p.col];
        }
    }
}
}  // namespace hal_sim

// Wave-collective over all 64 lanes.
__device__ inline void mfma_f32_32x32x8_f16(float d[16], const __half a[4], const __half b[4], const float c[16],
                                            const std::source_location& loc = std::source_location::current()) {
    ::hal_sim::MfmaSlot<__half> slot{d, a, b, c};
    ::hal_sim::collective(~0ull, 0, "mfma_f32_32x32x8_f16", &::hal_sim::mfma_32x32x8_compute<__half>, &slot, loc);
}
__device__ inline void mfma_f32_32x32x8_bf16(float d[16], const hip_bfloat16 a[4], const hip_bfloat16 b[4], const float c[16],
                                             const std::source_location& loc = std::source_location::current()) {
    ::hal_sim::MfmaSlot<hip_bfloat16> slot{d, a, b, c};
    ::hal_sim::collective(~0ull, 0, "mfma_f32_32x32x8_bf16", &::hal_sim::mfma_32x32x8_compute<hip_bfloat16>, &slot, loc);
}
#endif
