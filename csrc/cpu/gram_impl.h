// gram kernels over vector traits V (included by the kernels_*.cpp files after
// simd_common.h).
//
// V provides: F (vector of W fp32 lanes), W, zero, set1, load, store, add, sub,
// mul, fmadd(a, b, c) = a*b + c, hsum, round_f16 (fp32 -> fp16 -> fp32 RNE),
// load_src<DT>(p) (W raw elements -> fp32), store_dst<DT>(p, x) (fp32 -> W raw,
// RNE), kBf16Pairs (see simd_common.h), kFusedMaxT and kGramBlock (rows/cols kB
// of one register block: kB*kB accumulators + kB + 1 operands fit the registers).
//
// T <= kFusedMaxT (memory-bound): one pass, the deltas of a group go straight
// from the loads into the T(T+1)/2 accumulators held in registers.
// Larger T: the chunk goes in panels of kPanelVecs vectors of every row. Per panel
// the kB x kB register blocks of the upper triangle are visited column by column;
// the diagonal block of a column converts its kB rows from the inputs (delta =
// version - base, in fp32) while it multiplies them, and leaves them in the panel
// buffer D for the blocks above it, which read them back from cache. The conversion
// thus runs between FMAs rather than as a pass of its own, and D is one panel.
// Either way each accumulator lane sums its products in element order and the
// lanes are summed once, at chunk end.
//
// Measured on one Zen 4 core (bf16, 8M elements, medians of 5 interleaved runs, against
// the two-phase tile path this replaced, same sums and bits), GFLOP/s at T = 8/16/32/64/128:
// AVX-512 23/38/47/64/68 -> 49/61/69/82/88, AVX2 26/35/43/57/76 -> 43/55/71/79/82
// (the core's fp32 GEMM: 80-90).

// Vectors per row of a panel: D holds Tp x kPanelVecs*W fp32 (48 KB at T = 16: L1-L2).
// Wider panels load and store the accumulators less often; 32-64 measured alike on
// Zen 4 from T = 8 to 512 (16 was 10-40% slower), 48 best at most T.
constexpr size_t kPanelVecs = 48;

// Zero-padded copies of the last, partial group (count < 2W elements from element pos) of
// n <= N rows, so that the loops over whole groups can take it (zero deltas add nothing).
template <class V, int DT, int N>
struct PartialGroup {
    alignas(64) unsigned char buf[N][2 * V::W * 8] = {};
    const void* rows[N] = {};
    PartialGroup(const void* const* src, int n, size_t pos, size_t count) {
        for (int r = 0; r < n; ++r) {
            std::memcpy(buf[r], at<DT>(src[r], pos), count * dtype_size(DT));
            rows[r] = buf[r];
        }
    }
};

// Small T: rows[0] = base, rows[1..NT] = history, read from element pos on; one
// group of 2W elements goes from the loads into the NT(NT+1)/2 accumulators.
template <class V, int DT, bool F16D, int NT>
inline void gram_group_fused(const void* const* rows, size_t pos, typename V::F* acc) {
    using F = typename V::F;
    for (int h = 0; h < 2; ++h) {
        const F b = base_ref<V, F16D>(load_half<V, DT>(at<DT>(rows[0], pos), h));
        F d[NT];
        for (int i = 0; i < NT; ++i) d[i] = delta<V, F16D>(load_half<V, DT>(at<DT>(rows[i + 1], pos), h), b);
        int q = 0;
        for (int i = 0; i < NT; ++i)
            for (int j = i; j < NT; ++j, ++q) acc[q] = V::fmadd(d[i], d[j], acc[q]);
    }
}

template <class V, int DT, bool F16D, int NT>
void gram_chunk_fused(const Inputs& in, size_t off, size_t len, float* out) {
    using F = typename V::F;
    constexpr size_t G = 2 * V::W;
    constexpr size_t ahead = kPrefetchBytes / dtype_size(DT);
    const void* rows[NT + 1] = {in.base};
    for (int i = 0; i < NT; ++i) rows[i + 1] = in.hist[i];
    F acc[NT * (NT + 1) / 2];
    for (auto& a : acc) a = V::zero();
    const size_t full = len / G * G;
    for (size_t p = 0; p < full; p += G) {
        if (off + p + ahead < in.n)
            for (int i = 0; i <= NT; ++i)
                prefetch_bytes<true>(static_cast<const char*>(at<DT>(rows[i], off + p + ahead)), G * dtype_size(DT));
        gram_group_fused<V, DT, F16D, NT>(rows, off + p, acc);
    }
    if (full < len) {
        const PartialGroup<V, DT, NT + 1> tail(rows, NT + 1, off + full, len - full);
        gram_group_fused<V, DT, F16D, NT>(tail.rows, 0, acc);
    }
    int q = 0;
    for (int i = 0; i < NT; ++i)
        for (int j = i; j < NT; ++j, ++q) out[size_t(i) * NT + j] = out[size_t(j) * NT + i] = V::hsum(acc[q]);
}

template <class V, int DT, bool F16D, int NT = 1>
void gram_fused_dispatch(const Inputs& in, size_t off, size_t len, float* out) {
    if constexpr (NT <= V::kFusedMaxT) {
        if (in.T == NT) return gram_chunk_fused<V, DT, F16D, NT>(in, off, len, out);
        gram_fused_dispatch<V, DT, F16D, NT + 1>(in, off, len, out);
    }
}

// acc (kB*kB vectors, row-major r, c) += Da[r] . Db[c] over nvec vectors (c > r blocks:
// every entry).
template <class V>
inline void gram_block(const float* Da, const float* Db, size_t ld, size_t nvec, float* acc) {
    using F = typename V::F;
    constexpr int kB = V::kGramBlock;
    constexpr size_t W = V::W;
    F c[kB][kB];
    for (int r = 0; r < kB; ++r)
        for (int s = 0; s < kB; ++s) c[r][s] = V::load(acc + (r * kB + s) * W);
    for (size_t v = 0; v < nvec; ++v) {
        F a[kB];
        for (int r = 0; r < kB; ++r) a[r] = V::load(Da + r * ld + v * W);
        for (int s = 0; s < kB; ++s) {
            F bv = V::load(Db + s * ld + v * W);
            for (int r = 0; r < kB; ++r) c[r][s] = V::fmadd(a[r], bv, c[r][s]);
        }
    }
    for (int r = 0; r < kB; ++r)
        for (int s = 0; s < kB; ++s) V::store(acc + (r * kB + s) * W, c[r][s]);
}

// The diagonal block of rows[1..NR] (history rows; rows[0] the base; NR <= kB, the rows past
// it are padding up to a multiple of kB) over the groups [g0, g1) of 2W elements of a panel,
// group g read at element e0 + 2W*(g - g0) of the rows: converts each group into deltas, stores
// them in D (row stride ld, column 2W*g; gram_chunk_panels zeroes the padding rows once) and,
// First, the fp32 base into b; adds the products r <= s into acc. Inputs before pf_end are prefetched into L2
// kPrefetchBytes ahead (T+1 streams are more than the hardware prefetchers follow).
// NR is a template argument and each group goes half (W lanes) by half, so that the deltas and
// the accumulators stay in registers: with a run-time row count and both halves live, AVX2's
// 16 registers spilled them to the stack (a store and a load per delta). Each accumulator still
// takes the first half's product, then the second's, per group: the same sums, the same bits.
template <class V, int DT, bool F16D, bool First, int NR>
inline void gram_diag_convert(const void* const* rows, size_t e0, size_t pf_end, size_t g0, size_t g1, float* D,
                              size_t ld, float* b, float* acc) {
    using F = typename V::F;
    constexpr int kB = V::kGramBlock;
    constexpr size_t W = V::W;
    constexpr size_t G = 2 * W;
    constexpr size_t ahead = kPrefetchBytes / dtype_size(DT);
    F c[NR * (NR + 1) / 2];  // the upper triangle, row by row
    for (int r = 0, k = 0; r < NR; ++r)
        for (int s = r; s < NR; ++s, ++k) c[k] = V::load(acc + (r * kB + s) * W);
    // Two loops, the groups that prefetch and those past pf_end, so that the loop body has no
    // branch: with one, GCC kept the accumulators in registers but stored them to the stack
    // every group (6 stores per 12 FMAs, the store port the bound).
    auto groups = [&](size_t ga, size_t gb, auto prefetch) {
        for (size_t g = ga; g < gb; ++g) {
            const size_t p = g * G, e = e0 + (g - g0) * G;
            if constexpr (decltype(prefetch)::value)
                for (int r = First ? 0 : 1; r <= NR; ++r)
                    prefetch_bytes<false>(static_cast<const char*>(at<DT>(rows[r], e + ahead)), G * dtype_size(DT));
            for (int h = 0; h < 2; ++h) {
                const size_t q = p + h * W;
                F bh;
                if (First) {
                    bh = base_ref<V, F16D>(load_half<V, DT>(at<DT>(rows[0], e), h));
                    V::store(b + q, bh);
                } else {
                    bh = V::load(b + q);
                }
                F a[NR];
                for (int r = 0; r < NR; ++r) {
                    a[r] = delta<V, F16D>(load_half<V, DT>(at<DT>(rows[r + 1], e), h), bh);
                    V::store(D + size_t(r) * ld + q, a[r]);
                }
                for (int r = 0, k = 0; r < NR; ++r)
                    for (int s = r; s < NR; ++s, ++k) c[k] = V::fmadd(a[r], a[s], c[k]);
            }
        }
    };
    // Groups g < gp prefetch: e0 + (g - g0) * G + ahead < pf_end.
    const size_t gp = pf_end > e0 + ahead ? std::min(g1, g0 + (pf_end - e0 - ahead + G - 1) / G) : g0;
    groups(g0, gp, std::true_type{});
    groups(gp, g1, std::false_type{});
    for (int r = 0, k = 0; r < NR; ++r)
        for (int s = r; s < NR; ++s, ++k) V::store(acc + (r * kB + s) * W, c[k]);
}

// gram_diag_convert of the NR = min(kB, T - r0) history rows from r0 over elements
// [pos, pos + len) of one panel: the full groups read in place, the last partial one (zeros
// past len) from copies.
template <class V, int DT, bool F16D, int NR = V::kGramBlock>
void gram_diag_panel(const Inputs& in, size_t pos, size_t len, int r0, float* D, size_t ld, float* b, bool first,
                     float* acc) {
    constexpr size_t G = 2 * V::W;
    if constexpr (NR > 1) {
        if (in.T - r0 < NR) return gram_diag_panel<V, DT, F16D, NR - 1>(in, pos, len, r0, D, ld, b, first, acc);
    }
    const void* rows[NR + 1] = {in.base};
    for (int r = 0; r < NR; ++r) rows[r + 1] = in.hist[r0 + r];
    const size_t full = len / G;
    auto run = [&](const void* const* rs, size_t e0, size_t pf_end, size_t g0, size_t g1) {
        if (first)
            gram_diag_convert<V, DT, F16D, true, NR>(rs, e0, pf_end, g0, g1, D, ld, b, acc);
        else
            gram_diag_convert<V, DT, F16D, false, NR>(rs, e0, pf_end, g0, g1, D, ld, b, acc);
    };
    run(rows, pos, in.n, 0, full);
    if (full * G < len) {
        const PartialGroup<V, DT, NR + 1> tail(rows, NR + 1, pos + full * G, len - full * G);
        run(tail.rows, 0, 0, full, full + 1);
    }
}

// Index of register block (bi, bj), bi <= bj, in the row-major upper triangle of nb x nb.
inline size_t block_index(int bi, int bj, int nb) {
    return size_t(bi) * nb - size_t(bi) * (bi - 1) / 2 + size_t(bj - bi);
}

// The panel path's scratch, for T rows of a tensor of n elements: D (Tp = T rounded up to kB
// rows of ld floats), the fp32 base (ld floats), then the accumulators of the nb(nb+1)/2
// register blocks. A small tensor gets a panel no wider than itself (the scratch is zeroed per
// call: a MoE group calls once per tensor); the width changes no sum, only when the
// accumulators go to memory, so every width gives the same bits.
template <class V>
struct PanelLayout {
    static constexpr int kB = V::kGramBlock;
    int nb;
    size_t ld;
    PanelLayout(int T, size_t n)
        : nb(int(round_up(size_t(T), kB)) / kB),
          ld(std::min(kPanelVecs * V::W, round_up(std::max<size_t>(n, 1), 2 * V::W))) {}
    size_t block_floats() const { return size_t(kB) * kB * V::W; }
    size_t base_offset() const { return size_t(nb) * kB * ld; }  // after D
    size_t acc_offset() const { return base_offset() + ld; }     // after the base
    size_t acc_floats() const { return size_t(nb) * (nb + 1) / 2 * block_floats(); }
    size_t floats() const { return acc_offset() + acc_floats(); }
};

template <class V>
Plan gram_plan_t(int T, size_t n) {
    if (T <= V::kFusedMaxT) return Plan{0};
    return Plan{PanelLayout<V>(T, n).floats()};
}

template <class V, int DT, bool F16D>
void gram_chunk_panels(const Inputs& in, size_t off, size_t len, float* out, float* scratch) {
    constexpr size_t W = V::W;
    constexpr int kB = V::kGramBlock;
    const int T = in.T;
    const PanelLayout<V> lay(T, in.n);  // (gram_plan_t sized the scratch with the same layout)
    const int nb = lay.nb;
    const size_t ld = lay.ld;
    float* D = scratch;                       // Tp rows of ld deltas
    float* b = scratch + lay.base_offset();   // the fp32 base of the panel
    float* acc = scratch + lay.acc_offset();  // W-lane partial sums of every block, across panels
    const size_t blk = lay.block_floats();
    std::memset(acc, 0, sizeof(float) * lay.acc_floats());
    // the padding rows [T, Tp) of D: zeros the blocks of the last column read (into sums never output)
    std::memset(D + size_t(T) * ld, 0, sizeof(float) * (size_t(nb) * kB - T) * ld);
    for (size_t p0 = 0; p0 < len; p0 += ld) {
        const size_t pl = std::min(ld, len - p0);
        const size_t nvec = round_up(pl, 2 * W) / W;
        for (int bj = 0; bj < nb; ++bj) {
            float* Dj = D + size_t(bj) * kB * ld;
            gram_diag_panel<V, DT, F16D>(in, off + p0, pl, bj * kB, Dj, ld, b, bj == 0, acc + block_index(bj, bj, nb) * blk);
            for (int bi = 0; bi < bj; ++bi)
                gram_block<V>(D + size_t(bi) * kB * ld, Dj, ld, nvec, acc + block_index(bi, bj, nb) * blk);
        }
    }
    for (int bi = 0; bi < nb; ++bi)
        for (int bj = bi; bj < nb; ++bj) {
            const float* a = acc + block_index(bi, bj, nb) * blk;
            for (int r = 0; r < kB; ++r)
                for (int s = 0; s < kB; ++s) {
                    const int i = bi * kB + r, j = bj * kB + s;
                    if (i >= T || j >= T || i > j) continue;
                    const float v = V::hsum(V::load(a + (r * kB + s) * W));
                    out[size_t(i) * T + j] = v;
                    out[size_t(j) * T + i] = v;
                }
        }
}

template <class V>
void gram_chunk_t(const Inputs& in, size_t off, size_t len, float* out, float* scratch) {
    with_dtype(in, [&](auto tag) {
        constexpr int dt = decltype(tag)::dt;
        constexpr bool f16d = decltype(tag)::f16d;
        if (in.T <= V::kFusedMaxT)
            gram_fused_dispatch<V, dt, f16d>(in, off, len, out);
        else
            gram_chunk_panels<V, dt, f16d>(in, off, len, out, scratch);
    });
}

