// hal_sim/entry.h: what the generated entry points need: the launch descriptor Python packs, the
// argument unpacking by the kernel's parameter types (deduced from the function pointer, nothing
// is parsed), and the call into the runtime.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string_view>
#include <tuple>
#include <type_traits>
#include <utility>

namespace hal_sim {

enum ArgKind : int32_t { kArray = 0, kNull = 1, kInteger = 2, kFloating = 3, kBool = 4 };
enum ElemKind : int32_t { kElemUnknown = 0, kElemFloating = 1, kElemInteger = 2 };

struct ArgDesc {  // mirrored by executor.py (ctypes)
    int32_t kind;
    int32_t size;       // bytes of the value Python packed (8 for arrays and None)
    int32_t elem_size;  // arrays: bytes per element
    int32_t elem_kind;
    const char* desc;   // what Python passed, for messages: "a float32 array", "numpy.int64", ...
    const void* value;  // the packed value (arrays and None: a pointer-sized slot with the address)
};

struct LaunchDesc {  // mirrored by executor.py (ctypes)
    uint32_t grid[3];
    uint32_t block[3];
    uint64_t shared_bytes;
    int32_t nargs;
    int32_t pad_;
    const ArgDesc* args;
    char* error;  // message buffer for a failed launch
    uint64_t error_size;
};

// Runs body(ctx) as every thread of every block; returns 0 or writes the error and returns 1.
int run_launch(const LaunchDesc& desc, const char* kernel, void (*body)(void*), void* ctx);
int launch_error(const LaunchDesc& desc, const char* fmt, ...) __attribute__((format(printf, 2, 3)));

template <class T>
constexpr std::string_view type_name() {
    std::string_view p = __PRETTY_FUNCTION__;  // "... [with T = const float*; std::string_view = ...]"
    auto start = p.find("T = ") + 4;
    auto end = p.find_first_of(";]", start);
    return p.substr(start, end - start);
}

template <class P>
int unpack_arg(int index, P& out, const ArgDesc& a, const LaunchDesc& d, const char* kernel) {
    auto tn = type_name<P>();
    int tl = int(tn.size());
    if constexpr (std::is_pointer_v<P>) {
        using E = std::remove_cv_t<std::remove_pointer_t<P>>;
        if (a.kind == kNull) { out = nullptr; return 0; }
        if (a.kind != kArray)
            return launch_error(d, "argument %d of %s: the kernel takes '%.*s' (a pointer), Python passed %s (%d bytes)", index, kernel, tl, tn.data(), a.desc, a.size);
        if constexpr (!std::is_void_v<E>) {
            if (a.elem_size != int(sizeof(E)))
                return launch_error(d, "argument %d of %s: the kernel takes '%.*s' (elements of %zu bytes), Python passed %s (%d bytes per element)",
                                    index, kernel, tl, tn.data(), sizeof(E), a.desc, a.elem_size);
            if ((std::is_floating_point_v<E> && a.elem_kind == kElemInteger) || (std::is_integral_v<E> && a.elem_kind == kElemFloating))
                return launch_error(d, "argument %d of %s: the kernel takes '%.*s', Python passed %s (%s elements)", index, kernel, tl, tn.data(), a.desc,
                                    a.elem_kind == kElemInteger ? "integer" : "floating-point");
        }
        std::memcpy(&out, a.value, sizeof(void*));
        return 0;
    } else if constexpr (std::is_integral_v<P> || std::is_floating_point_v<P>) {
        bool kind_ok = std::is_floating_point_v<P> ? a.kind == kFloating : (a.kind == kInteger || a.kind == kBool);
        if (!kind_ok || a.size != int(sizeof(P)))
            return launch_error(d, "argument %d of %s: the kernel takes '%.*s' (%zu bytes), Python passed %s (%d bytes)", index, kernel, tl, tn.data(),
                                sizeof(P), a.desc, a.size);
        std::memcpy(&out, a.value, sizeof(P));
        return 0;
    } else {
        static_assert(std::is_trivially_copyable_v<P>, "kernel parameters must be pointers, integers or floating-point values");
        return launch_error(d, "argument %d of %s: parameter type '%.*s' cannot be passed from Python", index, kernel, tl, tn.data());
    }
}

template <class... P>
int launch_kernel(void (*kernel)(P...), const char* name, const LaunchDesc* d) {
    constexpr int n = int(sizeof...(P));
    if (d->nargs != n) return launch_error(*d, "%s takes %d arguments, Python passed %d", name, n, d->nargs);
    std::tuple<std::remove_cv_t<P>...> values{};
    int rc = 0;
    [&]<std::size_t... I>(std::index_sequence<I...>) {
        ((rc = rc ? rc : unpack_arg(int(I), std::get<I>(values), d->args[I], *d, name)), ...);
    }(std::index_sequence_for<P...>{});
    if (rc) return rc;
    auto call = [&]() { std::apply(kernel, values); };
    using Call = decltype(call);
    return run_launch(*d, name, [](void* c) { (*static_cast<Call*>(c))(); }, &call);
}

// Per parameter: 0 a value, 1 a pointer to const, 2 a pointer the kernel may write through.
template <class... P>
int param_info(void (*)(P...), int32_t* out, int32_t capacity) {
    int i = 0;
    ((i < capacity ? (out[i] = std::is_pointer_v<P> ? (std::is_const_v<std::remove_pointer_t<P>> ? 1 : 2) : 0) : 0, ++i), ...);
    return int(sizeof...(P));
}

}  // namespace hal_sim
