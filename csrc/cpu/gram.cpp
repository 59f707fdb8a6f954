// Threaded driver of the Gram accumulation (contract: relex_kernels/ops/reference.py).
//
// The range is cut into kGramChunk chunks counted from its start. Chunks are
// processed in waves: the threads compute the fp32 Gram of the wave's chunks
// into a buffer, then every acc entry adds the wave's partials in fp64 in
// increasing chunk order. The result therefore depends neither on the thread
// count nor on the schedule. Waves are as large as kPartialBytes allows, so the
// threads rarely meet at a barrier, and chunks are handed out dynamically: a
// thread slowed down by another process does not hold the others up. A range may
// be held in pieces (a tensor over several files, gram_pieces): each chunk is read
// from its piece, so the sums are those of the same range in one buffer.
#include <algorithm>
#include <vector>

#include "driver.h"

namespace relex {

namespace {
constexpr size_t kPartialBytes = size_t(32) << 20;
}

void gram_pieces(const Inputs& in, const Pieces& pc, double* acc, int nthreads) {
    const size_t n = in.n;
    check_pieces(in, pc, kGramChunk);
    if (n > 0 && in.T > 0 && !acc) throw std::invalid_argument("null acc pointer");
    if (n == 0 || in.T == 0) return;
    const IsaKernels& k = active_kernels();
    const size_t nchunks = (n + kGramChunk - 1) / kGramChunk;
    const int nt = threads_for(nthreads, nchunks);
    const size_t TT = size_t(in.T) * in.T;
    const size_t wave = std::min(nchunks, std::max(size_t(nt), kPartialBytes / (TT * sizeof(float))));
    const size_t per_thread = pad16(k.gram_plan(in.T, n).scratch_floats);
    AlignedFloats scratch(per_thread * nt + pad16(wave * TT));
    float* const partial = scratch.get() + per_thread * nt;
    // each chunk's piece (pieces start on chunk edges, so a chunk lies in one), found before the region
    std::vector<size_t> piece_of(nchunks);
    for (size_t c = 0, p = 0; c < nchunks; ++c) {
        while (pc.starts[p + 1] <= c * kGramChunk) ++p;
        piece_of[c] = p;
    }

#pragma omp parallel num_threads(nt)
    {
        float* mine = scratch.get() + per_thread * thread_id();
        for (size_t w0 = 0; w0 < nchunks; w0 += wave) {
            const int64_t wn = int64_t(std::min(wave, nchunks - w0));
#pragma omp for schedule(dynamic, 1)
            for (int64_t c = 0; c < wn; ++c) {
                const size_t p = piece_of[w0 + size_t(c)], off = (w0 + size_t(c)) * kGramChunk;
                // the chunk's elements from its piece's rows, at their offset in the piece
                k.gram_chunk(piece_inputs(in, pc, p), off - pc.starts[p], std::min(kGramChunk, n - off),
                             partial + size_t(c) * TT, mine);
            }
#pragma omp for schedule(static)
            for (int64_t e = 0; e < int64_t(TT); ++e) {
                double a = acc[e];
                for (int64_t c = 0; c < wn; ++c) a += double(partial[size_t(c) * TT + size_t(e)]);
                acc[e] = a;
            }
        }
    }
}

void gram(const Inputs& in, double* acc, int nthreads) {
    check_inputs(in);
    const OnePiece one(in);
    gram_pieces(in, one.pieces(), acc, nthreads);
}

}  // namespace relex
