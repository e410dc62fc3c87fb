// hip/hip_bfloat16.h for the host emulator (HAL_SIM): hip_bfloat16 as in ROCm: a `data` member,
// an explicit constructor from float (round to nearest even; NaN stays NaN) and float conversion.
#pragma once
#include "hal_sim/runtime.h"

struct hip_bfloat16 {
    uint16_t data;
    hip_bfloat16() = default;
    explicit hip_bfloat16(float f) : data(::hal_sim::f32_to_bf16_bits(f, ::hal_sim::NanStyle::Preserve)) {}
    operator float() const { return ::hal_sim::bf16_bits_to_f32(data); }
    hip_bfloat16& operator=(const float& f) { data = ::hal_sim::f32_to_bf16_bits(f, ::hal_sim::NanStyle::Preserve); return *this; }
};
static_assert(sizeof(hip_bfloat16) == 2);
