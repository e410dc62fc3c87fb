// cuda_bf16.h for the host emulator (HAL_SIM): __nv_bfloat16 with cvt.rn.bf16.f32 rounding
// (nearest even; NaN -> canonical 0x7FFF).
#pragma once
#include "hal_sim/runtime.h"

struct __nv_bfloat16 {
    unsigned short __x;
    __nv_bfloat16() = default;
    __nv_bfloat16(float f) : __x(::hal_sim::f32_to_bf16_bits(f)) {}
    operator float() const { return ::hal_sim::bf16_bits_to_f32(__x); }
};
static_assert(sizeof(__nv_bfloat16) == 2);

inline __nv_bfloat16 __float2bfloat16_rn(float f) { __nv_bfloat16 b; b.__x = ::hal_sim::f32_to_bf16_bits(f); return b; }
inline float __bfloat162float(__nv_bfloat16 b) { return ::hal_sim::bf16_bits_to_f32(b.__x); }
