// hal_sim/half.h: __half, __nv_bfloat16 and hip_bfloat16 as 2-byte trivially copyable structs
// holding the bit pattern; every conversion rounds to nearest even (hal_sim/convert.h).
// NaN codes follow the vendor of the build (HAL_SIM_WARP 32: NVIDIA's canonical 0x7FFF; 64: AMD).
#pragma once
#include "hal_sim/convert.h"

namespace hal_sim {
inline constexpr NanStyle kHalfNan = HAL_SIM_WARP == 64 ? NanStyle::Preserve : NanStyle::Canonical;
}

struct __half {
    unsigned short __x;
    __half() = default;
    __half(float f) : __x(::hal_sim::f32_to_f16_bits(f, ::hal_sim::kHalfNan)) {}
    operator float() const { return ::hal_sim::f16_bits_to_f32(__x); }
};
static_assert(sizeof(__half) == 2 && alignof(__half) == 2);
