// Helpers shared by the threaded drivers (gram.cpp, combine.cpp).
#pragma once

#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>

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

inline void check_inputs(const Inputs& in) {
    if (!valid_dtype(in.dtype)) throw std::invalid_argument("unknown dtype code " + std::to_string(in.dtype));
    if (in.T < 0) throw std::invalid_argument("negative history length");
    if (in.n == 0) return;
    if (!in.base) throw std::invalid_argument("null base pointer");
    for (int i = 0; i < in.T; ++i)
        if (!in.hist[i]) throw std::invalid_argument("null pointer for history " + std::to_string(i));
}

}  // namespace relex
