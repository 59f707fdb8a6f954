// Threaded driver of the weighted sum (contract: relex_kernels/ops/reference.py).
// Elements are independent, so any split is exact; blocks are contiguous per
// thread (static schedule) to keep each thread's reads and writes streaming.
#include <algorithm>

#include "driver.h"

namespace relex {

void combine(const Inputs& in, const float* alphas, int K, void* const* outs, int nthreads) {
    const size_t n = in.n;
    check_inputs(in);
    if (K < 0) throw std::invalid_argument("negative number of outputs");
    if (n == 0 || K == 0) return;
    if (in.T > 0 && !alphas) throw std::invalid_argument("null alphas pointer");
    for (int k = 0; k < K; ++k)
        if (!outs[k]) throw std::invalid_argument("null pointer for output " + std::to_string(k));
    const IsaKernels& ker = active_kernels();
    const size_t nblocks = (n + kCombineBlock - 1) / kCombineBlock;
    const int nt = threads_for(nthreads, nblocks);
    const size_t per_thread = pad16(ker.combine_plan(in.T, n).scratch_floats);
    AlignedFloats scratch(per_thread * nt);

#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t blk = 0; blk < int64_t(nblocks); ++blk) {
        const size_t off = size_t(blk) * kCombineBlock;
        ker.combine_block(in, off, std::min(kCombineBlock, n - off), alphas, K, outs,
                          scratch.get() + per_thread * thread_id());
    }
}

}  // namespace relex
