// Helpers shared by the kernels of every ISA: element groups, prefetch, the
// dtype dispatch. Included by kernels_{scalar,avx2,avx512}.cpp inside an anonymous
// namespace after their vector traits V (see gram_impl.h for what V provides),
// so that every instantiation carries its ISA's target flags and internal
// linkage (no ODR mixing of AVX-512 and baseline code). Requires dtype.h, kernels.h.
//
// Elements move in groups of 2W. With kBf16Pairs, V also provides
// load_bf16_pair / store_bf16_pair, which split a group of 2W bf16 into its even
// and odd elements with one load and two bit operations (no shuffles) and put
// them back together on the way out. The kernels then see a fixed permutation of
// the elements, which changes nothing: the Gram sums over elements, combine is
// elementwise and stores through the inverse permutation.

inline size_t round_up(size_t x, size_t m) { return (x + m - 1) / m * m; }

template <int DT>
inline const void* at(const void* p, size_t i) {
    return static_cast<const char*>(p) + i * size_t(dtype_size(DT));
}

// The 2W elements at p as two fp32 vectors (in the permuted order for split bf16).
template <class V, int DT>
inline void load_group(const void* p, typename V::F& a, typename V::F& b) {
    if constexpr (DT == kBF16 && V::kBf16Pairs) {
        V::load_bf16_pair(p, a, b);
    } else {
        a = V::template load_src<DT>(p);
        b = V::template load_src<DT>(at<DT>(p, V::W));
    }
}

// Inverse of load_group: rounds (RNE) and writes 2W elements.
template <class V, int DT>
inline void store_group(void* p, typename V::F a, typename V::F b) {
    if constexpr (DT == kBF16 && V::kBf16Pairs) {
        V::store_bf16_pair(p, a, b);
    } else {
        V::template store_dst<DT>(p, a);
        V::template store_dst<DT>(const_cast<void*>(at<DT>(p, V::W)), b);
    }
}

// load_group / store_group of the first count < 2W elements (zeros past count).
template <class V, int DT>
inline void load_group_part(const void* p, size_t count, typename V::F& a, typename V::F& b) {
    alignas(64) unsigned char buf[2 * V::W * 8] = {};
    std::memcpy(buf, p, count * dtype_size(DT));
    load_group<V, DT>(buf, a, b);
}

template <class V, int DT>
inline void store_group_part(void* p, size_t count, typename V::F a, typename V::F b) {
    alignas(64) unsigned char buf[2 * V::W * 8];
    store_group<V, DT>(buf, a, b);
    std::memcpy(p, buf, count * dtype_size(DT));
}

// The vector h (0 or 1) of the group at p; the other half's work is dead code.
template <class V, int DT>
inline typename V::F load_half(const void* p, int h) {
    typename V::F a, b;
    load_group<V, DT>(p, a, b);
    return h ? b : a;
}

// The delta of a loaded history vector x against the base as the kernels use it, bref: the
// fp32 base, or with fp16 deltas the base rounded to fp16 (base_ref) and the difference too.
// The one definition of the delta every gram and combine kernel computes (the bits contract).
template <class V, bool F16D>
inline typename V::F base_ref(typename V::F b) {
    return F16D ? V::round_f16(b) : b;
}
template <class V, bool F16D>
inline typename V::F delta(typename V::F x, typename V::F bref) {
    return F16D ? V::round_f16(V::sub(V::round_f16(x), bref)) : V::sub(x, bref);
}

template <int DT, bool F16D>
struct DtTag {
    static constexpr int dt = DT;
    static constexpr bool f16d = F16D;
};

// Calls op(DtTag<dtype, fp16_deltas>{}): one instantiation per storage dtype and mode.
template <class Op>
inline void with_dtype(const Inputs& in, Op&& op) {
    const bool f = in.fp16_deltas;
    switch (in.dtype) {
        case kF32: return f ? op(DtTag<kF32, true>{}) : op(DtTag<kF32, false>{});
        case kF16: return f ? op(DtTag<kF16, true>{}) : op(DtTag<kF16, false>{});
        case kBF16: return f ? op(DtTag<kBF16, true>{}) : op(DtTag<kBF16, false>{});
        case kF64: return f ? op(DtTag<kF64, true>{}) : op(DtTag<kF64, false>{});
    }
}

// Asks for [p, p + bytes) to be brought into cache: into L1 for the few-stream
// loops (Near), into L2 only for the loops over T+1 streams. Measured on Zen 4:
// L1 prefetches of many streams queue up behind the L1 miss buffers, while L2
// prefetches doubled the throughput of combine at T = 64 and added 20% to gram
// at T = 16; the hardware prefetchers follow a handful of streams by themselves.
template <bool Near>
inline void prefetch_bytes(const char* p, size_t bytes) {
#if defined(__GNUC__) || defined(__clang__)
    for (size_t i = 0; i < bytes; i += 64) __builtin_prefetch(p + i, 0, Near ? 3 : 1);
#else
    (void)p;
    (void)bytes;
#endif
}

// How far ahead of the rows they read the streaming loops prefetch.
constexpr size_t kPrefetchBytes = 2048;

// XOR of the 8-byte words of [p, p + nbytes) (then of the tail bytes): a pure read
// loop, auto-vectorised with this ISA's vectors, for the read-bandwidth probe.
inline uint64_t xor_words(const void* p, size_t nbytes) {
    const unsigned char* c = static_cast<const unsigned char*>(p);
    uint64_t x = 0;
    size_t i = 0;
    for (; i + 8 <= nbytes; i += 8) {
        uint64_t w;
        std::memcpy(&w, c + i, 8);
        x ^= w;
    }
    for (; i < nbytes; ++i) x ^= c[i];
    return x;
}

// Defines `const IsaKernels& fn()`, the table of the kernels for traits V. Used
// after the target region: building the table runs no ISA-specific code.
#define RELEX_DEFINE_KERNELS(fn, name, V)                                                    \
    const IsaKernels& fn() {                                                                 \
        static const IsaKernels k{name, int(V::W), &gram_plan_t<V>, &gram_chunk_t<V>,        \
                                  &combine_plan_t<V>, &combine_block_t<V>, &xor_words};      \
        return k;                                                                            \
    }
