// combine kernel over vector traits V (included by the kernels_*.cpp files after
// simd_common.h; V as described in gram_impl.h, plus kCombineU and kCombineU1).
//
// One pass, no intermediate buffer: a step of a few vectors of every output
// stays in registers while the T history rows stream through; each row's step
// is converted, subtracted and weighted in registers. Rows are prefetched into
// L2 kPrefetchBytes ahead, since T+1 streams are more than the hardware tracks
// (a prefetch past the end of a buffer is harmless: prefetches never fault).
// Outputs are produced two at a time (more would not fit the registers); a
// third or later output re-reads the step's rows, from L1. A single output (the usual
// run: one target) takes steps of kCombineU1 vectors, as many as the registers hold,
// twice as wide as two outputs' (bf16: 128 B of each row per visit on AVX2, 512 B on
// AVX-512); a whole step loads each group as it is used, so that only the sums hold
// registers. The inputs are mapped files in 4 KB pages: at T = 64 a step of 64 B per row
// meets a new page of some row about every step, and the mapped rows were read at ~0.6x
// (AVX2) and ~0.8x (AVX-512) the rate of the same bytes in anonymous memory; the wider
// steps read them ~1.5x and ~1.25x faster (benchmarks/results/e2e_cpu_epyc_T64.md).
//
// out_k = round(b + s_k), s_k = (((0 + a_k0*d_0) + a_k1*d_1) + ...): separate mul
// and add (the extension is built with -ffp-contract=off), the reference's order.

constexpr int kOutsPerPass = 2;

template <class V>
Plan combine_plan_t(int, size_t) {
    return Plan{2 * V::kCombineU1 * V::W};
}

// The U vectors of the step at src (count elements, zeros past count).
template <class V, int DT, size_t U>
inline void load_step(const void* src, size_t count, typename V::F* x) {
    constexpr size_t G = 2 * V::W;
    for (size_t g = 0; g < U / 2; ++g) {
        const void* p = at<DT>(src, g * G);
        if ((g + 1) * G <= count)
            load_group<V, DT>(p, x[2 * g], x[2 * g + 1]);
        else if (g * G < count)
            load_group_part<V, DT>(p, count - g * G, x[2 * g], x[2 * g + 1]);
        else
            x[2 * g] = x[2 * g + 1] = V::zero();
    }
}

template <class V, int DT, bool F16D, int KN, size_t U>
inline void combine_pass(const Inputs& in, size_t pos, size_t count, const float* b, const float* bref,
                         const float* const* alphas, void* const* outs) {
    using F = typename V::F;
    constexpr size_t W = V::W;
    F s[KN][U];
    for (int k = 0; k < KN; ++k)
        for (size_t u = 0; u < U; ++u) s[k][u] = V::zero();
    for (int i = 0; i < in.T; ++i) {
        const void* row = at<DT>(in.hist[i], pos);
        prefetch_bytes<false>(static_cast<const char*>(row) + kPrefetchBytes, U * W * dtype_size(DT));
        F a[KN];
        for (int k = 0; k < KN; ++k) a[k] = V::set1(alphas[k][i]);
        auto add = [&](size_t u, F x) {
            const F d = delta<V, F16D>(x, V::load(bref + u * W));
            for (int k = 0; k < KN; ++k) s[k][u] = V::add(s[k][u], V::mul(a[k], d));
        };
        if (count == U * W) {  // a whole step: a group loaded as it is used (the sums hold the registers)
            for (size_t u = 0; u < U; u += 2) {
                F x0, x1;
                load_group<V, DT>(at<DT>(row, u * W), x0, x1);
                add(u, x0);
                add(u + 1, x1);
            }
        } else {
            F x[U];
            load_step<V, DT, U>(row, count, x);
            for (size_t u = 0; u < U; ++u) add(u, x[u]);
        }
    }
    for (int k = 0; k < KN; ++k)
        for (size_t u = 0; u < U; u += 2) {
            const size_t e = u * W;
            if (e >= count) break;
            const F r0 = V::add(V::load(b + e), s[k][u]);
            const F r1 = V::add(V::load(b + e + W), s[k][u + 1]);
            void* o = const_cast<void*>(at<DT>(outs[k], pos + e));
            if (e + 2 * W <= count)
                store_group<V, DT>(o, r0, r1);
            else
                store_group_part<V, DT>(o, count - e, r0, r1);
        }
}

template <class V, int DT, bool F16D>
void combine_block_dt(const Inputs& in, size_t off, size_t len, const float* alphas, int K,
                      void* const* outs, float* scratch) {
    using F = typename V::F;
    constexpr size_t U = V::kCombineU1, U2 = V::kCombineU, W = V::W, S = U * W, S2 = U2 * W;
    static_assert(U2 % 2 == 0 && U % U2 == 0, "steps hold whole groups, and whole steps of two outputs");
    float* b = scratch;  // the step's fp32 base (and its fp16 rounding), in L1
    float* b16 = scratch + S;
    const float* bref = F16D ? b16 : b;
    for (size_t p = 0; p < len; p += S) {
        const size_t pos = off + p, count = std::min(S, len - p);
        F x[U];
        load_step<V, DT, U>(at<DT>(in.base, pos), count, x);
        prefetch_bytes<false>(static_cast<const char*>(at<DT>(in.base, pos)) + kPrefetchBytes,
                              S * dtype_size(DT));
        for (size_t u = 0; u < U; ++u) {
            V::store(b + u * W, x[u]);
            if (F16D) V::store(b16 + u * W, base_ref<V, F16D>(x[u]));
        }
        for (int k0 = 0; k0 < K; k0 += kOutsPerPass) {
            const float* al[kOutsPerPass];
            for (int k = 0; k < kOutsPerPass; ++k) al[k] = alphas + size_t(std::min(k0 + k, K - 1)) * in.T;
            if (K - k0 >= 2) {  // in steps of U2 vectors, both outputs' sums in registers
                for (size_t h = 0; h < count; h += S2)
                    combine_pass<V, DT, F16D, 2, U2>(in, pos + h, std::min(S2, count - h), b + h, bref + h, al,
                                                     outs + k0);
            } else {
                combine_pass<V, DT, F16D, 1, U>(in, pos, count, b, bref, al, outs + k0);
            }
        }
    }
}

template <class V>
void combine_block_t(const Inputs& in, size_t off, size_t len, const float* alphas, int K,
                     void* const* outs, float* scratch) {
    with_dtype(in, [&](auto tag) {
        combine_block_dt<V, decltype(tag)::dt, decltype(tag)::f16d>(in, off, len, alphas, K, outs, scratch);
    });
}
