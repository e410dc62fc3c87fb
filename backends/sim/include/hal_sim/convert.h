// hal_sim/convert.h: bit-exact float <-> half / bfloat16 / fp8 conversions, round to nearest even
// like the device instructions (cvt.rn.f16.f32, cvt.rn.bf16.f32, v_cvt_f16_f32, ...).
// Pure integer arithmetic: the result does not depend on the host FPU, flags or F16C.
#pragma once
#include <cstdint>
#include <cstring>

namespace hal_sim {

inline uint32_t f32_bits(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float f32_from_bits(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// Round `value` (an unsigned integer) right by `shift` bits, to nearest, ties to even.
inline uint32_t rshift_rne(uint32_t value, unsigned shift) {
    if (shift == 0) return value;
    if (shift > 31) return 0;  // callers pass values below 2^25: far less than half a unit
    uint32_t q = value >> shift, rem = value & ((1u << shift) - 1), half = 1u << (shift - 1);
    return q + (rem > half || (rem == half && (q & 1u)));
}

// NaN encodings differ per vendor: NVIDIA's cvt returns the canonical NaN 0x7FFF for both half and
// bfloat16; AMD's v_cvt_f16_f32 keeps sign and the top payload bits (quieted), and hip_bfloat16
// truncates the payload and sets the low mantissa bit so that a NaN stays a NaN.
enum class NanStyle { Canonical, Preserve };

inline uint16_t f32_to_f16_bits(float f, NanStyle nan = NanStyle::Canonical) {
    uint32_t x = f32_bits(f), sign = (x >> 16) & 0x8000u, ax = x & 0x7FFFFFFFu;
    if (ax > 0x7F800000u)
        return nan == NanStyle::Canonical ? 0x7FFFu : uint16_t(sign | 0x7E00u | ((ax >> 13) & 0x3FFu));
    if (ax >= 0x477FF000u) return uint16_t(sign | 0x7C00u);  // >= 65520 rounds to inf (and inf itself)
    if (ax < 0x38800000u) {                                   // below 2^-14: a half subnormal (or zero)
        if (ax <= 0x33000000u) return uint16_t(sign);           // <= 2^-25: ties to even -> 0
        uint32_t e = ax >> 23, m = (ax & 0x7FFFFFu) | 0x800000u;
        return uint16_t(sign | rshift_rne(m, 126 - e));         // units of 2^-24; 0x400 carries into the exponent
    }
    return uint16_t(sign | rshift_rne(ax - 0x38000000u, 13));   // rebias 127 -> 15; a carry may reach inf, as it should
}

inline float f16_bits_to_f32(uint16_t h) {
    uint32_t sign = uint32_t(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0x1F) return f32_from_bits(sign | 0x7F800000u | (m << 13));
    if (e == 0) {
        if (m == 0) return f32_from_bits(sign);
        float v = float(m) * 5.9604644775390625e-08f;  // m * 2^-24, exact
        return sign ? -v : v;
    }
    return f32_from_bits(sign | ((e + 112) << 23) | (m << 13));
}

inline uint16_t f32_to_bf16_bits(float f, NanStyle nan = NanStyle::Canonical) {
    uint32_t x = f32_bits(f);
    if ((x & 0x7FFFFFFFu) > 0x7F800000u)
        return nan == NanStyle::Canonical ? 0x7FFFu : uint16_t((x >> 16) | 1u);  // hip_bfloat16 keeps NaN a NaN
    return uint16_t((x + 0x7FFFu + ((x >> 16) & 1u)) >> 16);                   // overflow carries into inf: correct
}

inline float bf16_bits_to_f32(uint16_t b) { return f32_from_bits(uint32_t(b) << 16); }

// ---- fp8 (for later issues) ------------------------------------------------------------------
// Formats: OCP e4m3fn (bias 7, max 448, no inf, NaN S.1111.111), OCP e5m2 (bias 15, IEEE inf/NaN),
// FNUZ e4m3fnuz (bias 8, max 240) and e5m2fnuz (bias 16, max 57344): no -0, single NaN 0x80.
// Cast: round to nearest even; then with `saturate` (the convention hal picks, as cvt.rn.satfinite)
// every out-of-range finite value and +-inf become +-max and NaN stays NaN; without it, overflow is
// inf (e5m2) or NaN (no-inf formats), which is what ml_dtypes does.
struct Fp8Format { int mbits; int bias; bool has_inf; bool fnuz; uint8_t max_code; };
inline constexpr Fp8Format E4M3FN{3, 7, false, false, 0x7E};
inline constexpr Fp8Format E5M2{2, 15, true, false, 0x7B};
inline constexpr Fp8Format E4M3FNUZ{3, 8, false, true, 0x7F};
inline constexpr Fp8Format E5M2FNUZ{2, 16, false, true, 0x7F};

inline uint8_t f32_to_fp8_bits(float f, const Fp8Format& fmt, bool saturate = true) {
    uint32_t x = f32_bits(f), ax = x & 0x7FFFFFFFu;
    uint8_t sign = uint8_t((x >> 24) & 0x80u);
    uint8_t nan = fmt.fnuz ? 0x80 : uint8_t(sign | 0x7F);
    if (ax > 0x7F800000u) return nan;
    auto overflow = [&]() -> uint8_t {
        if (saturate) return uint8_t(sign | fmt.max_code);
        if (fmt.has_inf) return uint8_t(sign | 0x7C);
        return nan;
    };
    if (ax == 0x7F800000u) return overflow();
    int e = int(ax >> 23) - 127 + fmt.bias;  // biased exponent in the target format
    uint32_t m = ax & 0x7FFFFFu, code;
    if (ax < 0x00800000u) code = 0;  // float subnormals are far below every fp8 subnormal
    else if (e >= 1) code = rshift_rne((uint32_t(e) << 23) | m, 23 - fmt.mbits);
    else code = rshift_rne(m | 0x800000u, unsigned(23 - fmt.mbits + 1 - e));
    if (code > fmt.max_code) return overflow();
    if (code == 0 && fmt.fnuz) return 0;  // FNUZ has no negative zero
    return uint8_t(sign | code);
}

inline float fp8_bits_to_f32(uint8_t v, const Fp8Format& fmt) {
    if (fmt.fnuz && v == 0x80) return f32_from_bits(0x7FC00000u);
    uint32_t sign = uint32_t(v & 0x80u) << 24;
    int ebits = 7 - fmt.mbits, e = (v >> fmt.mbits) & ((1 << ebits) - 1);
    uint32_t m = v & ((1u << fmt.mbits) - 1);
    if (!fmt.fnuz) {
        if (fmt.has_inf && e == (1 << ebits) - 1) return f32_from_bits(sign | 0x7F800000u | (m ? 0x400000u : 0));
        if (!fmt.has_inf && (v & 0x7F) == 0x7F) return f32_from_bits(sign | 0x7FC00000u);
    }
    float mag;
    if (e == 0) mag = float(m) * f32_from_bits(uint32_t(127 + 1 - fmt.bias - fmt.mbits) << 23);  // m * 2^(1-bias-mbits)
    else mag = f32_from_bits((uint32_t(e - fmt.bias + 127) << 23) | (m << (23 - fmt.mbits)));
    return sign ? -mag : mag;
}

inline uint8_t f32_to_e4m3fn(float f, bool saturate = true) { return f32_to_fp8_bits(f, E4M3FN, saturate); }
inline uint8_t f32_to_e5m2(float f, bool saturate = true) { return f32_to_fp8_bits(f, E5M2, saturate); }
inline uint8_t f32_to_e4m3fnuz(float f, bool saturate = true) { return f32_to_fp8_bits(f, E4M3FNUZ, saturate); }
inline uint8_t f32_to_e5m2fnuz(float f, bool saturate = true) { return f32_to_fp8_bits(f, E5M2FNUZ, saturate); }
inline float e4m3fn_to_f32(uint8_t v) { return fp8_bits_to_f32(v, E4M3FN); }
inline float e5m2_to_f32(uint8_t v) { return fp8_bits_to_f32(v, E5M2); }
inline float e4m3fnuz_to_f32(uint8_t v) { return fp8_bits_to_f32(v, E4M3FNUZ); }
inline float e5m2fnuz_to_f32(uint8_t v) { return fp8_bits_to_f32(v, E5M2FNUZ); }

}  // namespace hal_sim
