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
// Larger T: a tile of `tw` elements of all T delta rows is converted into an
// fp32 block D (T x tw, L2-sized); the upper triangle of D Dᵀ is accumulated by a
// register-blocked kB x kB micro-kernel into W-lane partial sums that live
// across the whole chunk. Either way the lanes are summed once, at chunk end.

// Budgets for the fp32 delta tile. Small T: the whole tile fits L1 (32 KB), so the
// conversion's stores and the micro-kernel's loads hit L1 (measured on a Xeon with
// AVX-512: +33% at T = 16, +20% at T = 8 over an L2 tile). Larger T: an L1 tile would
// be a few vectors wide and the accumulators would be reloaded for every few FMAs,
// so the tile lives in L2 and the panels of the micro-kernel loop keep L1 busy.
constexpr size_t kL1TileBytes = 32 * 1024;
constexpr size_t kL2TileBytes = 160 * 1024;

// Tile width: a power of two (so it divides kGramChunk) keeping D within budget
// and no wider than a range of n elements needs (small tensors get small scratch).
template <class V>
inline size_t tile_width(int rows, size_t n) {
    const size_t budget = size_t(rows) * 16 * V::W * 4 <= kL1TileBytes ? kL1TileBytes : kL2TileBytes;
    size_t tw = 4096;
    while (tw > 4 * V::W && (size_t(rows) * tw * 4 > budget || tw / 2 >= n)) tw /= 2;
    return tw;
}

// Feeds emit(p, x) the fp32 vectors of src[off + p], p < round_up(len, 2W), group
// by group (zeros past len), prefetching the same row `len` elements ahead (at
// most pf elements): the next tile, needed once every other row has been
// converted. The prefetches are spread over the loop so that they do not queue
// up behind each other.
template <class V, int DT, class Emit>
inline void convert_row(const void* src, size_t off, size_t len, size_t pf, Emit&& emit) {
    using F = typename V::F;
    constexpr size_t G = 2 * V::W;
    const size_t full = len / G * G;
    const char* ahead = static_cast<const char*>(at<DT>(src, off + len));
    F a, b;
    for (size_t p = 0; p < full; p += G) {
        if (p < pf) prefetch_bytes<false>(ahead + p * dtype_size(DT), G * dtype_size(DT));
        load_group<V, DT>(at<DT>(src, off + p), a, b);
        emit(p, a);
        emit(p + V::W, b);
    }
    if (full < len) {
        load_group_part<V, DT>(at<DT>(src, off + full), len - full, a, b);
        emit(full, a);
        emit(full + V::W, b);
    }
}

// Converts elements [off, off+len) into fp32: b[p] = fp32(base), and row i of D
// (stride ld) = delta of history i. Entries up to round_up(len, 2W) are written
// (zeros past len). In fp16 mode the deltas use b16 = the fp16-rounded base.
template <class V, int DT, bool F16D>
void make_tile(const Inputs& in, size_t off, size_t len, size_t pf, float* D, size_t ld, float* b, float* b16) {
    using F = typename V::F;
    convert_row<V, DT>(in.base, off, len, pf, [&](size_t p, F x) {
        V::store(b + p, x);
        if (F16D) V::store(b16 + p, V::round_f16(x));
    });
    const float* bref = F16D ? b16 : b;
    for (int i = 0; i < in.T; ++i) {
        float* Di = D + size_t(i) * ld;
        convert_row<V, DT>(in.hist[i], off, len, pf, [&](size_t p, F x) {
            if (F16D) {
                V::store(Di + p, V::round_f16(V::sub(V::round_f16(x), V::load(bref + p))));
            } else {
                V::store(Di + p, V::sub(x, V::load(bref + p)));
            }
        });
    }
}

// acc (kB*kB vectors, row-major r, c) += Da[r] . Db[c] over nvec vectors. On a
// diagonal block (Da == Db) only the entries r <= c are computed.
// Meanwhile the cache lines [pf, pf + 64 * pf_lines) are prefetched into L2, two at
// most per step: the next tile's inputs arrive while this one computes.
template <class V, bool Diag>
inline void gram_block(const float* Da, const float* Db, size_t ld, size_t nvec, float* acc, const char* pf,
                       size_t pf_lines) {
    using F = typename V::F;
    constexpr int kB = V::kGramBlock;
    constexpr size_t W = V::W;
    F c[kB][kB];
    for (int r = 0; r < kB; ++r)
        for (int s = 0; s < kB; ++s) c[r][s] = V::load(acc + (r * kB + s) * W);
    for (size_t v = 0; v < nvec; ++v) {
        if (2 * v < pf_lines) {
            prefetch_bytes<false>(pf + 128 * v, 2 * v + 1 < pf_lines ? 128 : 64);
        }
        F a[kB];
        for (int r = 0; r < kB; ++r) a[r] = V::load(Da + r * ld + v * W);
        for (int s = 0; s < kB; ++s) {
            F bv = V::load(Db + s * ld + v * W);
            for (int r = 0; r < kB; ++r)
                if (!Diag || r <= s) c[r][s] = V::fmadd(a[r], bv, c[r][s]);
        }
    }
    for (int r = 0; r < kB; ++r)
        for (int s = 0; s < kB; ++s) V::store(acc + (r * kB + s) * W, c[r][s]);
}

// Vectors per panel of the micro-kernel loop: kB rows of them take kPanelBytes.
constexpr size_t kPanelBytes = 16 * 1024;
template <class V>
constexpr size_t kPanelVecs = kPanelBytes / (size_t(V::kGramBlock) * V::W * sizeof(float));

// Walks the cache lines of the next tile's T+1 input rows, handing them out in
// pieces that do not cross a row's end (see gram_block).
struct TilePrefetch {
    const Inputs* in = nullptr;
    size_t byte_off = 0, lines_per_row = 0, line = 0;
    int nrows = 0, row = 0;

    // Elements [off, off + len) of the base and every history row (len 0: nothing).
    template <int DT>
    void start(const Inputs& inputs, size_t off, size_t len) {
        in = &inputs;
        byte_off = off * dtype_size(DT);
        lines_per_row = (len * dtype_size(DT) + 63) / 64;
        nrows = len ? inputs.T + 1 : 0;
        row = 0;
        line = 0;
    }
    size_t total() const { return size_t(nrows) * lines_per_row; }
    // The next piece of at most `want` lines (its start in p); 0 when all are handed out.
    size_t next(size_t want, const char*& p) {
        if (row >= nrows) return 0;
        const size_t n = std::min(want, lines_per_row - line);
        p = static_cast<const char*>(row == 0 ? in->base : in->hist[row - 1]) + byte_off + 64 * line;
        line += n;
        if (line == lines_per_row) {
            ++row;
            line = 0;
        }
        return n;
    }
};

struct GramGeom {
    int Tp, nb;
    size_t tw, ld, npairs;  // ld: row stride of the tile, padded off multiples of 4 KB
};

template <class V>
GramGeom gram_geom(int T, size_t n) {
    constexpr int kB = V::kGramBlock;
    GramGeom g;
    g.Tp = int(round_up(size_t(T), kB));
    g.nb = g.Tp / kB;
    g.tw = tile_width<V>(g.Tp, n);
    // Rows 4 KB apart would all fall in one L1 set (the micro-kernel reads 2kB rows at
    // once, the tile conversion writes T): two cache lines of padding spread them.
    g.ld = g.tw + 32;
    g.npairs = size_t(g.nb) * (g.nb + 1) / 2;
    return g;
}

template <class V>
Plan gram_plan_t(int T, size_t n) {
    constexpr int kB = V::kGramBlock;
    if (T <= V::kFusedMaxT) return Plan{0};
    GramGeom g = gram_geom<V>(T, n);
    return Plan{size_t(g.Tp) * g.ld + 2 * g.ld + g.npairs * kB * kB * V::W};
}

// Small T: rows[0] = base, rows[1..NT] = history, read from element pos on; one
// group of 2W elements goes from the loads into the NT(NT+1)/2 accumulators.
template <class V, int DT, bool F16D, int NT>
inline void gram_group_fused(const void* const* rows, size_t pos, typename V::F* acc) {
    using F = typename V::F;
    for (int h = 0; h < 2; ++h) {
        F b = load_half<V, DT>(at<DT>(rows[0], pos), h);
        if (F16D) b = V::round_f16(b);
        F d[NT];
        for (int i = 0; i < NT; ++i) {
            const F x = load_half<V, DT>(at<DT>(rows[i + 1], pos), h);
            d[i] = F16D ? V::round_f16(V::sub(V::round_f16(x), b)) : V::sub(x, b);
        }
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
    if (full < len) {  // the last partial group, zero-padded (zero deltas add nothing)
        alignas(64) unsigned char tail[NT + 1][G * 8] = {};
        const void* trows[NT + 1];
        for (int i = 0; i <= NT; ++i) {
            std::memcpy(tail[i], at<DT>(rows[i], off + full), (len - full) * dtype_size(DT));
            trows[i] = tail[i];
        }
        gram_group_fused<V, DT, F16D, NT>(trows, 0, acc);
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

template <class V, int DT, bool F16D>
void gram_chunk_dt(const Inputs& in, size_t off, size_t len, float* out, float* scratch) {
    constexpr size_t W = V::W;
    constexpr int kB = V::kGramBlock;
    const int T = in.T;
    const GramGeom g = gram_geom<V>(T, in.n);
    float* D = scratch;
    float* b = D + size_t(g.Tp) * g.ld;
    float* acc = b + 2 * g.ld;
    std::memset(D + size_t(T) * g.ld, 0, sizeof(float) * size_t(g.Tp - T) * g.ld);
    std::memset(acc, 0, sizeof(float) * g.npairs * kB * kB * W);
    TilePrefetch next;
    for (size_t t0 = 0; t0 < len; t0 += g.tw) {
        const size_t tl = std::min(g.tw, len - t0);
        // The first tile is read as it converts; every later one was prefetched into
        // L2 while the tile before it computed.
        make_tile<V, DT, F16D>(in, off + t0, tl, 0, D, g.ld, b, b + g.ld);
        const size_t nvec = round_up(tl, 2 * W) / W;
        const size_t npanels = (nvec + kPanelVecs<V> - 1) / kPanelVecs<V>;
        const size_t t1 = std::min(len, t0 + g.tw);
        next.start<DT>(in, off + t1, std::min(len, t1 + g.tw) - t1);
        const size_t per_call = (next.total() + npanels * g.npairs - 1) / (npanels * g.npairs);
        // Panels of kc vectors: a block row's kB x kc panel stays in L1 while the
        // panels of the blocks right of it stream past from L2.
        for (size_t v0 = 0; v0 < nvec; v0 += kPanelVecs<V>) {
            const size_t vn = std::min(kPanelVecs<V>, nvec - v0);
            float* a = acc;
            for (int bi = 0; bi < g.nb; ++bi) {
                const float* Da = D + size_t(bi) * kB * g.ld + v0 * W;
                for (int bj = bi; bj < g.nb; ++bj, a += kB * kB * W) {
                    const char* pp = nullptr;
                    const size_t pn = next.next(per_call, pp);
                    if (bj == bi)
                        gram_block<V, true>(Da, Da, g.ld, vn, a, pp, pn);
                    else
                        gram_block<V, false>(Da, D + size_t(bj) * kB * g.ld + v0 * W, g.ld, vn, a, pp, pn);
                }
            }
        }
    }
    const float* a = acc;
    for (int bi = 0; bi < g.nb; ++bi)
        for (int bj = bi; bj < g.nb; ++bj, a += kB * kB * W)
            for (int r = 0; r < kB; ++r)
                for (int s = 0; s < kB; ++s) {
                    const int i = bi * kB + r, j = bj * kB + s;
                    if (i >= T || j >= T || i > j) continue;
                    const float v = V::hsum(V::load(a + (r * kB + s) * W));
                    out[size_t(i) * T + j] = v;
                    out[size_t(j) * T + i] = v;
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
            gram_chunk_dt<V, dt, f16d>(in, off, len, out, scratch);
    });
}

