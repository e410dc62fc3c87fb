// cuda_runtime.h for the host emulator (HAL_SIM, HAL_SIM_WARP=32): the CUDA side of what kernel
// code may use (docs/gpu-kernels.md): warp collectives with 32-bit masks.
#pragma once
#include "hal_sim/runtime.h"

#if HAL_SIM_WARP != 32
#error "cuda_runtime.h of the emulator is for warps of 32 (HAL_SIM_WARP=32)"
#endif

// All lanes named in `mask` must call the same collective with the same mask; the calling lane
// must be in it; a lane in the mask that has exited (or does not exist in a partial warp) is an
// error. Source lanes follow PTX shfl.sync: lane operands use their low 5 bits.
template <class T>
inline T __shfl_sync(unsigned mask, T var, int srcLane, int width = 32, const std::source_location& loc = std::source_location::current()) {
    ::hal_sim::check_width(width, "__shfl_sync", loc);
    return ::hal_sim::shuffle(mask, 0, "__shfl_sync", var, ::hal_sim::source_idx(::hal_sim::lane_id(), srcLane & 31, width), loc);
}
template <class T>
inline T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = 32, const std::source_location& loc = std::source_location::current()) {
    ::hal_sim::check_width(width, "__shfl_xor_sync", loc);
    return ::hal_sim::shuffle(mask, 0, "__shfl_xor_sync", var, ::hal_sim::source_xor(::hal_sim::lane_id(), laneMask & 31, width), loc);
}
template <class T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32, const std::source_location& loc = std::source_location::current()) {
    ::hal_sim::check_width(width, "__shfl_down_sync", loc);
    return ::hal_sim::shuffle(mask, 0, "__shfl_down_sync", var, ::hal_sim::source_down(::hal_sim::lane_id(), int(delta & 31), width), loc);
}
inline unsigned __ballot_sync(unsigned mask, int predicate, const std::source_location& loc = std::source_location::current()) {
    return unsigned(::hal_sim::ballot(mask, 0, "__ballot_sync", predicate, loc) & mask);
}
inline void __syncwarp(unsigned mask = 0xFFFFFFFFu, const std::source_location& loc = std::source_location::current()) {
    ::hal_sim::collective(mask, 0, "__syncwarp", &::hal_sim::nothing_compute, nullptr, loc);
}
