// hal_sim/mma.h: the matrix wrappers of docs/gpu-kernels.md, emulated as warp collectives with the
// ISA lane layouts of docs/hardware.md. The lane that completes the collective gathers every lane's
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

// ---- AMD CDNA3 fp8 / int8 MFMA (the HIP quantized GEMMs) ----------------------------------------
// v_mfma_f32_32x32x16_fp8_fp8 and v_mfma_i32_32x32x16_i8, wave64: 8 one-byte elements per lane in
// 2 registers (low byte of the first register first); D as the f16 32x32x8 shape. The fp8 inputs are
// FNUZ e4m3 (bias 8, NaN 0x80), the flavour gfx940/941/942 read; each product of two e4m3 values is
// exact in fp32. The int8 sum is exact int32 (two's-complement wrap, as the hardware). On gfx90a the
// int8 wrapper is two v_mfma_i32_32x32x8i8 over the two registers: exact either way, so one emulation.
namespace hal_sim::mma_layout {
inline RC mfma32x32x16_a(int lane, int r) { return {lane % 32, 8 * (lane / 32) + r}; }  // A[row][k]
inline RC mfma32x32x16_b(int lane, int r) { return {8 * (lane / 32) + r, lane % 32}; }  // B[k][col]
}  // namespace hal_sim::mma_layout

#if HAL_SIM_WARP == 64
#include "hal_sim/convert.h"

namespace hal_sim {
template <class Acc>
struct MfmaBytesSlot { Acc* d; const unsigned* a; const unsigned* b; const Acc* c; };

inline float fnuz_e4m3_byte(uint8_t v) { return e4m3fnuz_to_f32(v); }
inline int32_t int8_byte(uint8_t v) { return int8_t(v); }

// Acc is float (fp8 inputs decoded by Widen) or int32_t (int8); Sum is the type the dot product runs in.
template <class Acc, class Sum, Sum (*Widen)(uint8_t)>
void mfma_32x32x16_bytes_compute(void* const* payloads, uint64_t) {
    Sum A[32][16], B[16][32];
    Acc C[32][32];
    for (int lane = 0; lane < 64; ++lane) {
        auto* s = static_cast<MfmaBytesSlot<Acc>*>(payloads[lane]);
        for (int r = 0; r < 8; ++r) {
            auto p = mma_layout::mfma32x32x16_a(lane, r);
            A[p.row][p.col] = Widen(uint8_t(s->a[r / 4] >> (8 * (r % 4))));
            auto q = mma_layout::mfma32x32x16_b(lane, r);
            B[q.row][q.col] = Widen(uint8_t(s->b[r / 4] >> (8 * (r % 4))));
        }
        for (int r = 0; r < 16; ++r) {
            auto p = mma_layout::mfma32x32x8_cd(lane, r);
            C[p.row][p.col] = s->c[r];
        }
    }
    for (int lane = 0; lane < 64; ++lane) {
        auto* s = static_cast<MfmaBytesSlot<Acc>*>(payloads[lane]);
        for (int r = 0; r < 16; ++r) {
            auto p = mma_layout::mfma32x32x8_cd(lane, r);
            if constexpr (std::is_same_v<Acc, float>) {
                float acc = 0.0f;
                for (int k = 0; k < 16; ++k) acc += A[p.row][k] * B[k][p.col];
                s->d[r] = acc + C[p.row][p.col];
            } else {  // |a*b| <= 2^14, 16 of them: no overflow before adding c, which wraps like the device
                int32_t acc = 0;
                for (int k = 0; k < 16; ++k) acc += A[p.row][k] * B[k][p.col];
                s->d[r] = int32_t(uint32_t(acc) + uint32_t(C[p.row][p.col]));
            }
        }
    }
}
}  // namespace hal_sim

__device__ inline void mfma_f32_32x32x16_fp8(float d[16], const unsigned a[2], const unsigned b[2], const float c[16],
                                             const std::source_location& loc = std::source_location::current()) {
    ::hal_sim::MfmaBytesSlot<float> slot{d, a, b, c};
    ::hal_sim::collective(~0ull, 0, "mfma_f32_32x32x16_fp8", &::hal_sim::mfma_32x32x16_bytes_compute<float, float, ::hal_sim::fnuz_e4m3_byte>,
                          &slot, loc);
}
__device__ inline void mfma_i32_32x32x16_i8(int d[16], const unsigned a[2], const unsigned b[2], const int c[16],
                                            const std::source_location& loc = std::source_location::current()) {
    ::hal_sim::MfmaBytesSlot<int32_t> slot{d, a, b, c};
    ::hal_sim::collective(~0ull, 0, "mfma_i32_32x32x16_i8", &::hal_sim::mfma_32x32x16_bytes_compute<int32_t, int32_t, ::hal_sim::int8_byte>,
                          &slot, loc);
}
#endif

// ---- NVIDIA mma.sync m16n8k32 with 8-bit inputs (the CUDA quantized GEMMs) ---------------------
// mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 and .s32.s8.s8.s32: per lane A is 4 registers
// of 4 bytes (16 elements), B 2 registers (8 elements), C/D 4 values laid out as in m16n8k16; the
// lowest byte of a register is the first element. e4m3 is OCP e4m3fn (NaN S.1111.111): each product
// of two e4m3 values is exact in fp32, summed over k in order, then C is added (Hopper's tensor cores
// keep fewer accumulator bits, so device results differ within tolerance). The s8 sum is exact and
// wraps modulo 2^32 when C is added, as the device's (no .satfinite).
namespace hal_sim::mma_layout {
inline RC m16n8k32_a(int lane, int i) { int g = lane >> 2, t = lane & 3; return {g + 8 * ((i >> 2) & 1), 4 * t + (i & 3) + 16 * (i >> 3)}; }
inline RC m16n8k32_b(int lane, int i) { int g = lane >> 2, t = lane & 3; return {4 * t + (i & 3) + 16 * (i >> 2), g}; }  // B[k][n]
}  // namespace hal_sim::mma_layout

#if HAL_SIM_WARP == 32
#include "hal_sim/convert.h"

namespace hal_sim {
template <class Acc>
struct MmaBytesSlot { Acc* d; const unsigned* a; const unsigned* b; const Acc* c; };

inline float e4m3fn_byte(uint8_t v) { return e4m3fn_to_f32(v); }
inline int32_t s8_byte(uint8_t v) { return int8_t(v); }

// Acc is float (e4m3 inputs) or int32_t (s8 inputs).
template <class Acc, Acc (*Widen)(uint8_t)>
void mma_m16n8k32_compute(void* const* payloads, uint64_t) {
    Acc A[16][32], B[32][8], C[16][8];
    for (int lane = 0; lane < 32; ++lane) {
        auto* s = static_cast<MmaBytesSlot<Acc>*>(payloads[lane]);
        for (int i = 0; i < 16; ++i) {
            auto p = mma_layout::m16n8k32_a(lane, i);
            A[p.row][p.col] = Widen(uint8_t(s->a[i >> 2] >> (8 * (i & 3))));
        }
        for (int i = 0; i < 8; ++i) {
            auto p = mma_layout::m16n8k32_b(lane, i);
            B[p.row][p.col] = Widen(uint8_t(s->b[i >> 2] >> (8 * (i & 3))));
        }
        for (int i = 0; i < 4; ++i) {
            auto p = mma_layout::m16n8k16_cd(lane, i);
            C[p.row][p.col] = s->c[i];
        }
    }
    // d may alias c: everything is gathered before anything is scattered.
    for (int lane = 0; lane < 32; ++lane) {
        auto* s = static_cast<MmaBytesSlot<Acc>*>(payloads[lane]);
        for (int i = 0; i < 4; ++i) {
            auto p = mma_layout::m16n8k16_cd(lane, i);
            Acc acc = 0;  // s8: |a*b| <= 2^14, 32 of them: no overflow before c is added
            for (int k = 0; k < 32; ++k) acc += A[p.row][k] * B[k][p.col];
            if constexpr (std::is_same_v<Acc, float>) s->d[i] = acc + C[p.row][p.col];
            else s->d[i] = int32_t(uint32_t(acc) + uint32_t(C[p.row][p.col]));
        }
    }
}
}  // namespace hal_sim

// Warp-collective over all 32 lanes.
__device__ inline void mma_m16n8k32_e4m3(float d[4], const unsigned a[4], const unsigned b[2], const float c[4],
                                         const std::source_location& loc = std::source_location::current()) {
    ::hal_sim::MmaBytesSlot<float> slot{d, a, b, c};
    ::hal_sim::collective(0xFFFFFFFFull, 0, "mma_m16n8k32_e4m3", &::hal_sim::mma_m16n8k32_compute<float, ::hal_sim::e4m3fn_byte>, &slot, loc);
}
__device__ inline void mma_m16n8k32_s8(int d[4], const unsigned a[4], const unsigned b[2], const int c[4],
                                       const std::source_location& loc = std::source_location::current()) {
    ::hal_sim::MmaBytesSlot<int32_t> slot{d, a, b, c};
    ::hal_sim::collective(0xFFFFFFFFull, 0, "mma_m16n8k32_s8", &::hal_sim::mma_m16n8k32_compute<int32_t, ::hal_sim::s8_byte>, &slot, loc);
}
#endif
