// Threaded driver of the weighted sum (contract: relex_kernels/ops/reference.py).
// Elements are independent, so any split is exact; blocks are contiguous per
// thread (static schedule) to keep each thread's reads and writes streaming.
#include <algorithm>
#include <vector>

#include "driver.h"

namespace relex {

namespace {

void check_outputs(const Inputs& in, const float* alphas, int K, void* const* outs) {
    if (K < 0) throw std::invalid_argument("negative number of outputs");
    if (in.n == 0 || K == 0) return;
    if (in.T > 0 && !alphas) throw std::invalid_argument("null alphas pointer");
    for (int k = 0; k < K; ++k)
        if (!outs[k]) throw std::invalid_argument("null pointer for output " + std::to_string(k));
}

}  // namespace

void combine_pieces(const Inputs& in, const Pieces& pc, const float* alphas, int K, void* const* outs, int nthreads) {
    const size_t n = in.n;
    check_pieces(in, pc, 1);
    check_outputs(in, alphas, K, outs);
    if (n == 0 || K == 0) return;
    const IsaKernels& ker = active_kernels();
    const size_t nblocks = (n + kCombineBlock - 1) / kCombineBlock;
    const int nt = threads_for(nthreads, nblocks);
    const size_t per_thread = pad16(ker.combine_plan(in.T, n).scratch_floats);
    const size_t esz = dtype_size(in.dtype);
    AlignedFloats scratch(per_thread * nt);
    std::vector<void*> local_outs(size_t(nt) * size_t(K));  // each thread's outputs of the piece at hand

#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t blk = 0; blk < int64_t(nblocks); ++blk) {
        const size_t b0 = size_t(blk) * kCombineBlock, b1 = std::min(n, b0 + kCombineBlock);
        void** mine = local_outs.data() + size_t(thread_id()) * size_t(K);
        // the block split where pieces meet: each element is computed alone, so any split is exact
        size_t p = size_t(std::upper_bound(pc.starts, pc.starts + pc.count + 1, b0) - pc.starts) - 1;
        for (size_t a = b0; a < b1; ++p) {
            const size_t e = std::min(b1, pc.starts[p + 1]);
            for (int k = 0; k < K; ++k) mine[k] = static_cast<char*>(outs[k]) + pc.starts[p] * esz;
            ker.combine_block(piece_inputs(in, pc, p), a - pc.starts[p], e - a, alphas, K, mine,
                              scratch.get() + per_thread * thread_id());
            a = e;
        }
    }
}

void combine(const Inputs& in, const float* alphas, int K, void* const* outs, int nthreads) {
    check_inputs(in);
    const OnePiece one(in);
    combine_pieces(in, one.pieces(), alphas, K, outs, nthreads);
}

}  // namespace relex
