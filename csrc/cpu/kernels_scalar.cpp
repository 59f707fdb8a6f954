// Portable tile kernels (one fp32 lane): the path of aarch64 and of x86 CPUs
// without AVX2+FMA+F16C, and the reference the SIMD paths are tested against.
#include <algorithm>
#include <cstring>
#include <type_traits>

#include "dtype.h"
#include "kernels.h"

namespace relex {
namespace {

// Eight fp32 lanes as a plain array: no ISA intrinsics, yet the lane loops are
// auto-vectorised (SSE2 on x86-64, NEON on aarch64), and eight partial sums per
// Gram entry keep the fp32 chunk sums as accurate as on the SIMD paths.
struct VScalar {
    struct F {
        float v[8];
    };
    static constexpr size_t W = 8;
    static constexpr bool kBf16Pairs = false;
    static constexpr int kGramBlock = 2;
    static constexpr int kFusedMaxT = 4;
    static constexpr size_t kCombineU = 4;
    static constexpr size_t kCombineU1 = 4;  // one output (combine_impl.h)
    template <class Op>
    static F map(Op op) {
        F r;
        for (size_t l = 0; l < W; ++l) r.v[l] = op(l);
        return r;
    }
    static F zero() { return set1(0.0f); }
    static F set1(float x) { return map([&](size_t) { return x; }); }
    static F load(const float* p) { return map([&](size_t l) { return p[l]; }); }
    static void store(float* p, const F& x) { std::memcpy(p, x.v, sizeof x.v); }
    static F add(const F& a, const F& b) { return map([&](size_t l) { return a.v[l] + b.v[l]; }); }
    static F sub(const F& a, const F& b) { return map([&](size_t l) { return a.v[l] - b.v[l]; }); }
    static F mul(const F& a, const F& b) { return map([&](size_t l) { return a.v[l] * b.v[l]; }); }
    static F fmadd(const F& a, const F& b, const F& c) {
        return map([&](size_t l) { return a.v[l] * b.v[l] + c.v[l]; });
    }
    static float hsum(const F& x) {
        return ((x.v[0] + x.v[4]) + (x.v[1] + x.v[5])) + ((x.v[2] + x.v[6]) + (x.v[3] + x.v[7]));
    }
    static F round_f16(const F& x) { return map([&](size_t l) { return relex::round_f16(x.v[l]); }); }
    template <int DT> static F load_src(const void* p) {
        return map([&](size_t l) { return load_scalar<DT>(p, l); });
    }
    template <int DT> static void store_dst(void* p, const F& x) {
        for (size_t l = 0; l < W; ++l) store_scalar<DT>(p, l, x.v[l]);
    }
};

#include "simd_common.h"
#include "gram_impl.h"
#include "combine_impl.h"

}  // namespace

RELEX_DEFINE_KERNELS(scalar_kernels, "scalar", VScalar)

}  // namespace relex
