// hip/hip_runtime.h for the host emulator (HAL_SIM, HAL_SIM_WARP=64): the HIP side of what kernel
// code may use (docs/gpu-kernels.md): wave64 collectives, legacy maskless forms and the ROCm 6.2
// *_sync forms whose mask must be a 64-bit integer (checked at compile time, as ROCm does).
#pragma once
#include "hal_sim/runtime.h"

#if HAL_SIM_WARP != 64
#error "hip/hip_runtime.h of the emulator is for waves of 64 (HAL_SIM_WARP=64)"
#endif

// Legacy forms: the lanes of the wave that are still running take part (on AMD the exited lanes
// are simply inactive); reading from a lane that does not take part gives 0.
template <class T>
inline T __shfl(T var, int srcLane, int width = warpSize, const std::source_location& loc = std::source_location::current()) {
    ::hal_sim::check_width(width, "__shfl", loc);
    return ::hal_sim::shuffle(0, ::hal_sim::kMaskless, "__shfl", var, ::hal_sim::source_idx(::hal_sim::lane_id(), srcLane, width), loc);
}
template <class T>
inline T __shfl_xor(T var, int laneMask, int width = warpSize, const std::source_location& loc = std::source_location::current()) {
    ::hal_sim::check_width(width, "__shfl_xor", loc);
    return ::hal_sim::shuffle(0, ::hal_sim::kMaskless, "__shfl_xor", var, ::hal_sim::source_xor(::hal_sim::lane_id(), laneMask, width), loc);
}
template <class T>
inline T __shfl_down(T var, unsigned delta, int width = warpSize, const std::source_location& loc = std::source_location::current()) {
    ::hal_sim::check_width(width, "__shfl_down", loc);
    return ::hal_sim::shuffle(0, ::hal_sim::kMaskless, "__shfl_down", var, ::hal_sim::source_down(::hal_sim::lane_id(), int(delta), width), loc);
}
inline unsigned long long __ballot(int predicate, const std::source_location& loc = std::source_location::current()) {
    return ::hal_sim::ballot(0, ::hal_sim::kMaskless, "__ballot", predicate, loc);
}

// ROCm 6.2 *_sync forms: the lanes named in the 64-bit mask take part; all of them must be running.
#define HAL_SIM_CHECK_MASK(MaskT)                                                                  \
    static_assert(std::is_integral_v<MaskT> && sizeof(MaskT) == 8,                                  \
                  "The mask must be a 64-bit integer. Implicitly promoting a smaller integer is almost always an error.")

template <class MaskT, class T>
inline T __shfl_sync(MaskT mask, T var, int srcLane, int width = warpSize, const std::source_location& loc = std::source_location::current()) {
    HAL_SIM_CHECK_MASK(MaskT);
    ::hal_sim::check_width(width, "__shfl_sync", loc);
    return ::hal_sim::shuffle(uint64_t(mask), 0, "__shfl_sync", var, ::hal_sim::source_idx(::hal_sim::lane_id(), srcLane, width), loc);
}
template <class MaskT, class T>
inline T __shfl_xor_sync(MaskT mask, T var, int laneMask, int width = warpSize, const std::source_location& loc = std::source_location::current()) {
    HAL_SIM_CHECK_MASK(MaskT);
    ::hal_sim::check_width(width, "__shfl_xor_sync", loc);
    return ::hal_sim::shuffle(uint64_t(mask), 0, "__shfl_xor_sync", var, ::hal_sim::source_xor(::hal_sim::lane_id(), laneMask, width), loc);
}
template <class MaskT, class T>
inline T __shfl_down_sync(MaskT mask, T var, unsigned delta, int width = warpSize, const std::source_location& loc = std::source_location::current()) {
    HAL_SIM_CHECK_MASK(MaskT);
    ::hal_sim::check_width(width, "__shfl_down_sync", loc);
    return ::hal_sim::shuffle(uint64_t(mask), 0, "__shfl_down_sync", var, ::hal_sim::source_down(::hal_sim::lane_id(), int(delta), width), loc);
}
template <class MaskT>
inline unsigned long long __ballot_sync(MaskT mask, int predicate, const std::source_location& loc = std::source_location::current()) {
    HAL_SIM_CHECK_MASK(MaskT);
    return ::hal_sim::ballot(uint64_t(mask), 0, "__ballot_sync", predicate, loc) & uint64_t(mask);
}
