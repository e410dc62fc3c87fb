// hal_sim/runtime.h: the core of the host emulator, shared by the CUDA and HIP front headers.
//
// Model (docs/gpu-kernels.md, "The emulator"): a launch's blocks are spread over a pool of OS
// worker threads; a worker runs one block at a time, and the block's threads are fibers on that
// worker (a hand-written context switch). Fibers yield only at __syncthreads() and at warp
// collectives, which is where the hardware synchronizes too, so any order of execution between
// those points is one the hardware could produce.
//
// __shared__ is `static thread_local`: a worker runs one block at a time and all of that block's
// fibers run on the worker's OS thread, so they share its thread-local storage, and a fiber never
// migrates to another OS thread, so an address of a thread_local cached by the compiler across a
// switch stays right. Dynamic shared memory: HAL_SIM_DYNAMIC_SHARED(type, name) declares, at block
// scope inside the kernel, `type* const name` pointing at this block's buffer of the launch's
// shared_bytes (filled with 0xFF bytes, NaN as float, at block start: its contents are undefined
// on the device too). The kernels' common headers map HAL_DYNAMIC_SHARED to it under HAL_SIM.
#pragma once
#ifndef HAL_SIM
#error "hal_sim headers are for the host emulator build, which defines HAL_SIM"
#endif
#ifndef HAL_SIM_WARP
#define HAL_SIM_WARP 32
#endif
#if HAL_SIM_WARP != 32 && HAL_SIM_WARP != 64
#error "HAL_SIM_WARP must be 32 (cuda-sim) or 64 (rocm-sim)"
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <math.h>
#include <source_location>
#include <type_traits>

#include "hal_sim/types.h"
#include "hal_sim/convert.h"

// ---- qualifiers ------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ static thread_local
#define HAL_SIM_DYNAMIC_SHARED(type, name) type* const name = static_cast<type*>(::hal_sim::dynamic_shared())
// (__restrict__ is a g++/clang++ keyword already.)

// warpSize is a run-time value on the device (not a constant expression): the same here.
extern const int warpSize;

namespace hal_sim {

using Loc = std::source_location;

// What a kernel can see of the thread running it. The first member of the runtime's fiber.
struct ThreadView {
    uint3 thread_idx;
    uint3 block_idx;
    dim3 block_dim;
    dim3 grid_dim;
    unsigned linear;  // x + y*Dx + z*Dx*Dy: the order lanes fill warps in
    unsigned lane;    // linear % warp size
};

extern thread_local ThreadView* tl_current;
inline const ThreadView& current() { return *tl_current; }

void* dynamic_shared();
void syncthreads(const Loc& loc);
[[noreturn]] void fail(const char* fmt, ...) __attribute__((format(printf, 1, 2)));

// Warp collectives. Every participating lane calls collective() with a pointer to its own payload
// (on its fiber stack). The lane that completes the group runs `compute` once for the whole warp
// while the others are parked, with payloads[lane] set for participants and nullptr otherwise; it
// writes every lane's result into its payload. Lanes exchange values with their own warp only.
using Compute = void (*)(void* const* payloads, uint64_t participants);
enum : int { kMaskless = 1 };  // HIP legacy forms: the group is every lane still running
void collective(uint64_t mask, int flags, const char* op, Compute compute, void* payload, const Loc& loc);

inline unsigned lane_id() { return tl_current->lane; }
inline uint64_t full_mask() { return HAL_SIM_WARP == 64 ? ~0ull : 0xFFFFFFFFull; }

inline void check_width(int width, const char* op, const Loc& loc) {
    if (width < 1 || width > HAL_SIM_WARP || (width & (width - 1)))
        fail("%s at %s:%u: width %d is not a power of two in [1, %d]", op, loc.file_name(), loc.line(), width, HAL_SIM_WARP);
}

template <class T>
struct ShuffleSlot {
    T value;
    int source;  // lane to read from
    T result;
};

template <class T>
void shuffle_compute(void* const* payloads, uint64_t participants) {
    for (int lane = 0; lane < HAL_SIM_WARP; ++lane) {
        if (!((participants >> lane) & 1)) continue;
        auto* me = static_cast<ShuffleSlot<T>*>(payloads[lane]);
        int s = me->source;
        if (s >= 0 && s < HAL_SIM_WARP && ((participants >> s) & 1))
            std::memcpy(&me->result, &static_cast<ShuffleSlot<T>*>(payloads[s])->value, sizeof(T));
        else
            std::memset(&me->result, 0, sizeof(T));  // reading a lane that does not take part: undefined on the device; 0 here
    }
}

template <class T>
inline T shuffle(uint64_t mask, int flags, const char* op, T value, int source, const Loc& loc) {
    static_assert(std::is_trivially_copyable_v<T>, "warp shuffles move trivially copyable values");
    ShuffleSlot<T> slot;
    std::memcpy(&slot.value, &value, sizeof(T));
    slot.source = source;
    collective(mask, flags, op, &shuffle_compute<T>, &slot, loc);
    return slot.result;
}

struct BallotSlot { int predicate; uint64_t result; };
inline void ballot_compute(void* const* payloads, uint64_t participants) {
    uint64_t bits = 0;
    for (int lane = 0; lane < HAL_SIM_WARP; ++lane)
        if (((participants >> lane) & 1) && static_cast<BallotSlot*>(payloads[lane])->predicate) bits |= 1ull << lane;
    for (int lane = 0; lane < HAL_SIM_WARP; ++lane)
        if ((participants >> lane) & 1) static_cast<BallotSlot*>(payloads[lane])->result = bits;
}
inline uint64_t ballot(uint64_t mask, int flags, const char* op, int predicate, const Loc& loc) {
    BallotSlot slot{predicate != 0, 0};
    collective(mask, flags, op, &ballot_compute, &slot, loc);
    return slot.result;
}

inline void nothing_compute(void* const*, uint64_t) {}

// Source lanes, as the hardware computes them (PTX shfl.sync with c = ((32 - width) << 8) | 31 on
// NVIDIA; ds_bpermute index arithmetic of the HIP headers on AMD). A lane whose source falls past
// the end of its width-segment reads its own value; xor may reach earlier segments.
inline int source_xor(int lane, int lane_mask, int width) {
    int j = lane ^ lane_mask;
    return j >= ((lane & ~(width - 1)) + width) ? lane : j;
}
inline int source_idx(int lane, int src, int width) { return (lane & ~(width - 1)) + (src & (width - 1)); }
inline int source_down(int lane, int delta, int width) {
    return (lane & (width - 1)) + delta >= width ? lane : lane + delta;
}

}  // namespace hal_sim

#define threadIdx (::hal_sim::current().thread_idx)
#define blockIdx (::hal_sim::current().block_idx)
#define blockDim (::hal_sim::current().block_dim)
#define gridDim (::hal_sim::current().grid_dim)

// __syncthreads(): a real barrier of the block's threads. Every thread of the block must reach
// each barrier (a thread that returned while others wait, or waits after others returned, is an
// error reported with the barrier's source line, where the hardware would hang or misbehave).
inline void __syncthreads(const std::source_location& loc = std::source_location::current()) { ::hal_sim::syncthreads(loc); }

// ---- atomics: relaxed, like the device's atomicAdd / atomicMax ----------------------------------
inline float atomicAdd(float* address, float value) {
    return std::atomic_ref<float>(*address).fetch_add(value, std::memory_order_relaxed);
}
inline int atomicAdd(int* address, int value) {
    return std::atomic_ref<int>(*address).fetch_add(value, std::memory_order_relaxed);
}
inline int atomicMax(int* address, int value) {
    std::atomic_ref<int> a(*address);
    int old = a.load(std::memory_order_relaxed);
    while (old < value && !a.compare_exchange_weak(old, value, std::memory_order_relaxed)) {}
    return old;
}

// ---- math --------------------------------------------------------------------------------------
// expf logf tanhf erff sqrtf fmaxf fminf fabsf and INFINITY come from <math.h>.
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }
inline float __expf(float x) { return expf(x); }  // the device's fast approximation is within tolerance of this
inline float __fdividef(float a, float b) { return a / b; }

// min / max for any mix of arithmetic types, with the usual arithmetic conversions (as the CUDA and
// HIP overload sets: min(int, unsigned) is unsigned, min(float, int) is float).
template <class A, class B, class = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> min(A a, B b) {
    using C = std::common_type_t<A, B>;
    if constexpr (std::is_floating_point_v<C>) return fmin(C(a), C(b));
    else return C(b) < C(a) ? C(b) : C(a);
}
template <class A, class B, class = std::enable_if_t<std::is_arithmetic_v<A> && std::is_arithmetic_v<B>>>
inline std::common_type_t<A, B> max(A a, B b) {
    using C = std::common_type_t<A, B>;
    if constexpr (std::is_floating_point_v<C>) return fmax(C(a), C(b));
    else return C(a) < C(b) ? C(b) : C(a);
}
