// hip/hip_fp16.h for the host emulator (HAL_SIM): __half with v_cvt_f16_f32 rounding (nearest
// even; a NaN keeps its sign and top payload bits, quieted).
#pragma once
#include "hal_sim/runtime.h"
#include "hal_sim/half.h"

inline __half __float2half(float f) { __half h; h.__x = ::hal_sim::f32_to_f16_bits(f, ::hal_sim::NanStyle::Preserve); return h; }
inline float __half2float(__half h) { return ::hal_sim::f16_bits_to_f32(h.__x); }
