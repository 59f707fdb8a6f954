// AVX2 + FMA + F16C tile kernels (8 fp32 lanes). Compiled for that target by a
// pragma region so the rest of the extension stays baseline x86-64; only
// called after cpu_features.cpp has checked the CPU and the OS.
#include <algorithm>
#include <cstring>
#include <type_traits>

#include "dtype.h"
#include "kernels.h"

#ifdef RELEX_X86_KERNELS
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace relex {
namespace {

struct VAvx2 {
    using F = __m256;
    static constexpr size_t W = 8;
    static F zero() { return _mm256_setzero_ps(); }
    static F set1(float x) { return _mm256_set1_ps(x); }
    static F load(const float* p) { return _mm256_loadu_ps(p); }
    static void store(float* p, F x) { _mm256_storeu_ps(p, x); }
    static F add(F a, F b) { return _mm256_add_ps(a, b); }
    static F sub(F a, F b) { return _mm256_sub_ps(a, b); }
    static F mul(F a, F b) { return _mm256_mul_ps(a, b); }
    static F fmadd(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
    static float hsum(F x) {
        __m128 s = _mm_add_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
        s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        s = _mm_add_ss(s, _mm_movehdup_ps(s));
        return _mm_cvtss_f32(s);
    }
    static F round_f16(F x) { return _mm256_cvtph_ps(_mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT)); }

    template <int DT> static F load_src(const void* p);
    template <int DT> static void store_dst(void* p, F x);

    static constexpr bool kBf16Pairs = true;
    static constexpr int kGramBlock = 3;
    static constexpr int kFusedMaxT = 4;
    static constexpr size_t kCombineU = 4;
    static constexpr size_t kCombineU1 = 8;  // one output (combine_impl.h)
    static void load_bf16_pair(const void* p, F& even, F& odd) {
        const __m256i x = _mm256_loadu_si256(static_cast<const __m256i*>(p));
        even = _mm256_castsi256_ps(_mm256_slli_epi32(x, 16));
        odd = _mm256_castsi256_ps(_mm256_and_si256(x, _mm256_set1_epi32(int(0xFFFF0000u))));
    }
    // The bf16 of x (the integer RNE of dtypes.from_float32; a NaN keeps its top bits
    // and gets the quiet bit) in the high half of each 32-bit lane, low half zero.
    static __m256i bf16_high(F x) {
        const __m256i u = _mm256_castps_si256(x);
        const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
        __m256i r = _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7FFF)), lsb);
        const __m256i q = _mm256_or_si256(u, _mm256_set1_epi32(0x00400000));
        r = _mm256_blendv_epi8(r, q, _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
        return _mm256_and_si256(r, _mm256_set1_epi32(int(0xFFFF0000u)));
    }
    static void store_bf16_pair(void* p, F even, F odd) {
        const __m256i v = _mm256_or_si256(_mm256_srli_epi32(bf16_high(even), 16), bf16_high(odd));
        _mm256_storeu_si256(static_cast<__m256i*>(p), v);
    }
};

template <> inline __m256 VAvx2::load_src<kF32>(const void* p) { return _mm256_loadu_ps(static_cast<const float*>(p)); }
template <> inline __m256 VAvx2::load_src<kF16>(const void* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(static_cast<const __m128i*>(p)));
}
template <> inline __m256 VAvx2::load_src<kBF16>(const void* p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
template <> inline __m256 VAvx2::load_src<kF64>(const void* p) {
    const double* d = static_cast<const double*>(p);
    return _mm256_set_m128(_mm256_cvtpd_ps(_mm256_loadu_pd(d + 4)), _mm256_cvtpd_ps(_mm256_loadu_pd(d)));
}

template <> inline void VAvx2::store_dst<kF32>(void* p, __m256 x) { _mm256_storeu_ps(static_cast<float*>(p), x); }
template <> inline void VAvx2::store_dst<kF16>(void* p, __m256 x) {
    _mm_storeu_si128(static_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT));
}
template <> inline void VAvx2::store_dst<kBF16>(void* p, __m256 x) {
    const __m256i r = _mm256_srli_epi32(bf16_high(x), 16);  // <= 0xFFFF: packus keeps it
    const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
    _mm_storeu_si128(static_cast<__m128i*>(p), packed);
}
template <> inline void VAvx2::store_dst<kF64>(void* p, __m256 x) {
    double* d = static_cast<double*>(p);
    _mm256_storeu_pd(d, _mm256_cvtps_pd(_mm256_castps256_ps128(x)));
    _mm256_storeu_pd(d + 4, _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)));
}

#include "simd_common.h"
#include "gram_impl.h"
#include "combine_impl.h"

}  // namespace
}  // namespace relex

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

namespace relex {
RELEX_DEFINE_KERNELS(avx2_kernels, "avx2", VAvx2)
}  // namespace relex

#endif  // RELEX_X86_KERNELS
