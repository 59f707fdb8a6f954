// Helpers shared by the threaded drivers (gram.cpp, combine.cpp).
#pragma once

#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "dtype.h"
#include "kernels.h"

namespace relex {

// Zeroed, 64-byte aligned float scratch, allocated before any parallel region
// (an exception must not escape an OpenMP region).
class AlignedFloats {
public:
    explicit AlignedFloats(size_t n) {
        const size_t bytes = (n * sizeof(float) + 63) / 64 * 64;
        p_ = static_cast<float*>(std::aligned_alloc(64, bytes ? bytes : 64));
        if (!p_) throw std::bad_alloc();
        std::memset(p_, 0, bytes);
    }
    ~AlignedFloats() { std::free(p_); }
    AlignedFloats(const AlignedFloats&) = delete;
    AlignedFloats& operator=(const AlignedFloats&) = delete;
    float* get() const { return p_; }

private:
    float* p_;
};

// Elements per combine block: the unit a thread of combine() works on.
constexpr size_t kCombineBlock = size_t(1) << 16;

inline size_t pad16(size_t n) { return (n + 15) / 16 * 16; }

inline int thread_id() {
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

// Threads worth starting for `work` independent items.
inline int threads_for(int requested, size_t work) {
#ifdef _OPENMP
    if (requested < 1) throw std::invalid_argument("num_threads must be >= 1");
    return int(std::min<size_t>(size_t(requested), std::max<size_t>(work, 1)));
#else
    (void)requested;
    (void)work;
    return 1;
#endif
}

inline void check_kind(const Inputs& in) {
    if (!valid_dtype(in.dtype)) throw std::invalid_argument("unknown dtype code " + std::to_string(in.dtype));
    if (in.T < 0) throw std::invalid_argument("negative history length");
}

inline void check_inputs(const Inputs& in) {
    check_kind(in);
    if (in.n == 0) return;
    if (!in.base) throw std::invalid_argument("null base pointer");
    for (int i = 0; i < in.T; ++i)
        if (!in.hist[i]) throw std::invalid_argument("null pointer for history " + std::to_string(i));
}

// Checks of a Pieces description of a range of `in.n` elements (`chunk`: every start on an edge of
// it, 1 for none). Throws std::invalid_argument.
inline void check_pieces(const Inputs& in, const Pieces& pc, size_t chunk) {
    check_kind(in);
    if (!pc.starts || (pc.count && !pc.rows)) throw std::invalid_argument("null pieces table");
    if (pc.starts[0] != 0 || pc.starts[pc.count] != in.n)
        throw std::invalid_argument("pieces must cover [0, n) of the range");
    const size_t rows = size_t(in.T) + 1;
    for (size_t p = 0; p < pc.count; ++p) {
        if (pc.starts[p + 1] <= pc.starts[p]) throw std::invalid_argument("pieces must be non-empty and in order");
        if (pc.starts[p] % chunk) throw std::invalid_argument("a piece starts inside a chunk");
        for (size_t v = 0; v < rows; ++v)
            if (!pc.rows[p * rows + v]) throw std::invalid_argument("null pointer in the pieces table");
    }
}

// A contiguous range (in.base, in.hist) as one piece: gram() and combine() are the piece calls of it.
class OnePiece {
public:
    explicit OnePiece(const Inputs& in) : starts_{0, in.n}, rows_(size_t(in.T) + 1), count_(in.n ? 1 : 0) {
        if (!count_) return;  // (an empty range may come without pointers)
        rows_[0] = in.base;
        for (int i = 0; i < in.T; ++i) rows_[size_t(i) + 1] = in.hist[i];
    }
    Pieces pieces() const { return Pieces{starts_, rows_.data(), count_}; }

private:
    size_t starts_[2];
    std::vector<const void*> rows_;
    size_t count_;
};

// Inputs of piece p: its own row pointers, the offsets the caller passes relative to the piece.
// n stays the range's: the kernels' layouts depend on it (and their prefetch hints, bounded by
// n, may then reach past the piece: a prefetch never faults)
inline Inputs piece_inputs(const Inputs& in, const Pieces& pc, size_t p) {
    Inputs local = in;
    const size_t rows = size_t(in.T) + 1;
    local.base = pc.rows[p * rows];
    local.hist = pc.rows + p * rows + 1;
    return local;
}

}  // namespace relex

