// A plain multi-threaded read loop: the read-bandwidth bound that the benchmark
// compares the kernels with, measured over the same buffers they read.
#include <algorithm>

#include "driver.h"

namespace relex {

// Reads nbytes of each of nbuf buffers (tails included) in 256 KB blocks per buffer
// (long enough for the hardware prefetchers, short enough to balance the threads)
// and returns an XOR checksum, so that nothing can be optimised away.
uint64_t read_probe(const void* const* bufs, int nbuf, size_t nbytes, int nthreads) {
    if (nbuf < 0) throw std::invalid_argument("negative buffer count");
    for (int i = 0; i < nbuf; ++i)
        if (nbytes && !bufs[i]) throw std::invalid_argument("null buffer pointer");
    const IsaKernels& k = active_kernels();
    const size_t block = size_t(1) << 18;
    const size_t nblocks = (nbytes + block - 1) / block;
    const int nt = threads_for(nthreads, nblocks);
    uint64_t total = 0;
#pragma omp parallel for schedule(static) num_threads(nt) reduction(^ : total)
    for (int64_t blk = 0; blk < int64_t(nblocks); ++blk) {
        const size_t b0 = size_t(blk) * block, len = std::min(nbytes, b0 + block) - b0;
        for (int i = 0; i < nbuf; ++i) total ^= k.xor_words(static_cast<const char*>(bufs[i]) + b0, len);
    }
    return total;
}

}  // namespace relex
