// AVX-512 (F, BW, VL, DQ) tile kernels (16 fp32 lanes). Compiled for that
// target by a pragma region; only called after cpu_features.cpp has checked
// the CPU and that the OS saves the ZMM state.
//
// AVX512_BF16 is detected but deliberately unused: VCVTNEPS2BF16 flushes
// denormal inputs and outputs to zero (so it is not the exact RNE of the
// contract) and VDPBF16PS would round the fp32 deltas to bf16. bf16 is widened
// with a shift and rounded with integer RNE instead; both cost little next to
// memory traffic.
#include <algorithm>
#include <cstring>
#include <type_traits>

#include "dtype.h"
#include "kernels.h"

#ifdef RELEX_X86_KERNELS
#include <immintrin.h>

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"))), \
                             apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
// GCC 12's own _mm512_undefined_pd() (self-initialised) trips this warning
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif

namespace relex {
namespace {

struct VAvx512 {
    using F = __m512;
    static constexpr size_t W = 16;
    static F zero() { return _mm512_setzero_ps(); }
    static F set1(float x) { return _mm512_set1_ps(x); }
    static F load(const float* p) { return _mm512_loadu_ps(p); }
    static void store(float* p, F x) { _mm512_storeu_ps(p, x); }
    static F add(F a, F b) { return _mm512_add_ps(a, b); }
    static F sub(F a, F b) { return _mm512_sub_ps(a, b); }
    static F mul(F a, F b) { return _mm512_mul_ps(a, b); }
    static F fmadd(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
    static float hsum(F x) { return _mm512_reduce_add_ps(x); }
    static F round_f16(F x) {
        return _mm512_cvtph_ps(_mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }

    template <int DT> static F load_src(const void* p);
    template <int DT> static void store_dst(void* p, F x);

    static constexpr bool kBf16Pairs = true;
    static constexpr int kGramBlock = 4;
    static constexpr int kFusedMaxT = 6;
    static constexpr size_t kCombineU = 8;
    static constexpr size_t kCombineU1 = 16;  // one output (combine_impl.h)
    static void load_bf16_pair(const void* p, F& even, F& odd) {
        const __m512i x = _mm512_loadu_si512(p);
        even = _mm512_castsi512_ps(_mm512_slli_epi32(x, 16));
        odd = _mm512_castsi512_ps(_mm512_and_si512(x, _mm512_set1_epi32(int(0xFFFF0000u))));
    }
    // The bf16 of x (the integer RNE of dtypes.from_float32; a NaN keeps its top bits
    // and gets the quiet bit) in the high half of each 32-bit lane, low half zero.
    static __m512i bf16_high(F x) {
        const __m512i u = _mm512_castps_si512(x);
        const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7FFF)), lsb);
        r = _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), u, _mm512_set1_epi32(0x00400000));
        return _mm512_and_si512(r, _mm512_set1_epi32(int(0xFFFF0000u)));
    }
    static void store_bf16_pair(void* p, F even, F odd) {
        _mm512_storeu_si512(p, _mm512_or_si512(_mm512_srli_epi32(bf16_high(even), 16), bf16_high(odd)));
    }
};

template <> inline __m512 VAvx512::load_src<kF32>(const void* p) { return _mm512_loadu_ps(p); }
template <> inline __m512 VAvx512::load_src<kF16>(const void* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
}
template <> inline __m512 VAvx512::load_src<kBF16>(const void* p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
}
template <> inline __m512 VAvx512::load_src<kF64>(const void* p) {
    const double* d = static_cast<const double*>(p);
    __m512 lo = _mm512_castps256_ps512(_mm512_cvtpd_ps(_mm512_loadu_pd(d)));
    return _mm512_insertf32x8(lo, _mm512_cvtpd_ps(_mm512_loadu_pd(d + 8)), 1);
}

template <> inline void VAvx512::store_dst<kF32>(void* p, __m512 x) { _mm512_storeu_ps(p, x); }
template <> inline void VAvx512::store_dst<kF16>(void* p, __m512 x) {
    _mm256_storeu_si256(static_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
template <> inline void VAvx512::store_dst<kBF16>(void* p, __m512 x) {
    _mm256_storeu_si256(static_cast<__m256i*>(p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_high(x), 16)));
}
template <> inline void VAvx512::store_dst<kF64>(void* p, __m512 x) {
    double* d = static_cast<double*>(p);
    _mm512_storeu_pd(d, _mm512_cvtps_pd(_mm512_castps512_ps256(x)));
    _mm512_storeu_pd(d + 8, _mm512_cvtps_pd(_mm512_extractf32x8_ps(x, 1)));
}

#include "simd_common.h"
#include "gram_impl.h"
#include "combine_impl.h"

}  // namespace
}  // namespace relex

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

namespace relex {
RELEX_DEFINE_KERNELS(avx512_kernels, "avx512", VAvx512)
}  // namespace relex

#endif  // RELEX_X86_KERNELS
