// cuda_fp16.h for the host emulator (HAL_SIM): __half and its round-to-nearest-even conversions.
#pragma once
#include "hal_sim/runtime.h"
#include "hal_sim/half.h"

inline __half __float2half_rn(float f) { __half h; h.__x = ::hal_sim::f32_to_f16_bits(f, ::hal_sim::NanStyle::Canonical); return h; }
inline float __half2float(__half h) { return ::hal_sim::f16_bits_to_f32(h.__x); }
