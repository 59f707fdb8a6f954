// Storage dtypes of the native kernels and their exact scalar conversions.
//
// The codes must match relex_kernels/io/dtypes.py DTYPE_CODES. The scalar
// conversions are the portable path and the tail/reference of the SIMD paths:
// every rounding is round-to-nearest-even and bit-identical to numpy's
// (bf16: the formula of dtypes.from_float32; fp16: IEEE RNE like F16C).
#pragma once

#include <cstdint>
#include <cstring>

namespace relex {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

constexpr bool valid_dtype(int code) { return code >= kF32 && code <= kF64; }

constexpr int dtype_size(int code) {
    switch (code) {
        case kF32: return 4;
        case kF16: return 2;
        case kBF16: return 2;
        case kF64: return 8;
        default: return 0;
    }
}

inline uint32_t f32_bits(float f) {
    uint32_t u;
    std::memcpy(&u, &f, 4);
    return u;
}

inline float bits_f32(uint32_t u) {
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}

inline float bf16_to_f32(uint16_t h) { return bits_f32(uint32_t(h) << 16); }

inline uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_bits(f);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u)  // NaN: keep sign and payload, force quiet bit
        return uint16_t((u >> 16) | 0x40u);
    return uint16_t((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

inline float f16_to_f32(uint16_t h) {
    uint32_t sign = uint32_t(h & 0x8000u) << 16;
    uint32_t e = (h >> 10) & 0x1Fu, m = h & 0x3FFu;
    if (e == 0x1F) return bits_f32(sign | 0x7F800000u | (m << 13) | (m ? 0x400000u : 0u));
    if (e == 0) {  // zero or subnormal: m * 2^-24 is exact in fp32
        float v = float(m) * 5.9604644775390625e-08f;
        return bits_f32(sign | f32_bits(v));
    }
    return bits_f32(sign | ((e + 112u) << 23) | (m << 13));
}

inline uint16_t f32_to_f16(float f) {
    uint32_t x = f32_bits(f);
    uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7FFFFFFFu;
    if (ax >= 0x7F800000u) {  // inf, or NaN made quiet with its top payload (as F16C does)
        if (ax == 0x7F800000u) return uint16_t(sign | 0x7C00u);
        return uint16_t(sign | 0x7E00u | ((ax >> 13) & 0x3FFu));
    }
    if (ax >= 0x477FF000u) return uint16_t(sign | 0x7C00u);  // >= 65520 rounds to inf
    uint32_t q, rem, half;
    if (ax < 0x38800000u) {  // below 2^-14: an fp16 subnormal (or zero)
        uint32_t e = ax >> 23;
        if (e < 102) return uint16_t(sign);  // below 2^-25: rounds to zero
        uint32_t m = (ax & 0x7FFFFFu) | 0x800000u;
        uint32_t s = 126 - e;  // 14..24
        q = m >> s;
        rem = m & ((1u << s) - 1);
        half = 1u << (s - 1);
    } else {  // normal: rebias the exponent, round off 13 mantissa bits
        uint32_t r = ax - 0x38000000u;
        q = r >> 13;
        rem = r & 0x1FFFu;
        half = 0x1000u;
    }
    if (rem > half || (rem == half && (q & 1u))) ++q;  // carries into the exponent correctly
    return uint16_t(sign | q);
}

// fp32 -> fp16 -> fp32, the rounding of the fp16_deltas mode
inline float round_f16(float f) { return f16_to_f32(f32_to_f16(f)); }

template <int DT> inline float load_scalar(const void* p, size_t i);
template <> inline float load_scalar<kF32>(const void* p, size_t i) {
    float v;
    std::memcpy(&v, static_cast<const char*>(p) + 4 * i, 4);
    return v;
}
template <> inline float load_scalar<kF16>(const void* p, size_t i) {
    uint16_t v;
    std::memcpy(&v, static_cast<const char*>(p) + 2 * i, 2);
    return f16_to_f32(v);
}
template <> inline float load_scalar<kBF16>(const void* p, size_t i) {
    uint16_t v;
    std::memcpy(&v, static_cast<const char*>(p) + 2 * i, 2);
    return bf16_to_f32(v);
}
template <> inline float load_scalar<kF64>(const void* p, size_t i) {
    double v;
    std::memcpy(&v, static_cast<const char*>(p) + 8 * i, 8);
    return float(v);
}

template <int DT> inline void store_scalar(void* p, size_t i, float x);
template <> inline void store_scalar<kF32>(void* p, size_t i, float x) {
    std::memcpy(static_cast<char*>(p) + 4 * i, &x, 4);
}
template <> inline void store_scalar<kF16>(void* p, size_t i, float x) {
    uint16_t v = f32_to_f16(x);
    std::memcpy(static_cast<char*>(p) + 2 * i, &v, 2);
}
template <> inline void store_scalar<kBF16>(void* p, size_t i, float x) {
    uint16_t v = f32_to_bf16(x);
    std::memcpy(static_cast<char*>(p) + 2 * i, &v, 2);
}
template <> inline void store_scalar<kF64>(void* p, size_t i, float x) {
    double v = x;
    std::memcpy(static_cast<char*>(p) + 8 * i, &v, 8);
}

}  // namespace relex
