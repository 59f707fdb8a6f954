// Many small tensors in one call: the engine's groups (relex_kernels/engine/streaming.py),
// for a MoE model's thousands of tensors, where one OpenMP region per tensor and per pass
// cost more than the tensor's bytes. A tensor of fewer Gram chunks (combine blocks) than
// threads runs whole on one thread, such tensors spread over the threads; a larger one runs
// alone with every thread. Neither gram() nor combine() depends on the thread count, so
// every tensor gets the bits of a call of its own.
#include <exception>
#include <vector>

#include "driver.h"

namespace relex {

namespace {

// Run f(i) for each item: the ones marked `whole` one after another with every thread, the
// rest in parallel, one thread each. An exception is rethrown after the region.
template <class F>
void run_many(size_t count, int nthreads, const std::vector<char>& whole, F f) {
    std::vector<int64_t> small;
    for (size_t i = 0; i < count; ++i) {
        if (whole[i])
            f(i, nthreads);
        else
            small.push_back(int64_t(i));
    }
    const int nt = threads_for(nthreads, small.size());
    std::exception_ptr err;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t j = 0; j < int64_t(small.size()); ++j) {
        try {
            f(size_t(small[size_t(j)]), 1);
        } catch (...) {
#pragma omp critical(relex_many_error)
            if (!err) err = std::current_exception();
        }
    }
    if (err) std::rethrow_exception(err);
}

}  // namespace

void gram_many(const Inputs* ins, double* const* accs, size_t count, int nthreads) {
    threads_for(nthreads, 1);  // a bad count is an error before any work
    std::vector<char> whole(count);
    for (size_t i = 0; i < count; ++i) {
        check_inputs(ins[i]);
        whole[i] = (ins[i].n + kGramChunk - 1) / kGramChunk >= size_t(nthreads) && nthreads > 1;
    }
    run_many(count, nthreads, whole, [&](size_t i, int nt) { gram(ins[i], accs[i], nt); });
}

void combine_many(const Inputs* ins, const float* const* alphas, int K, void* const* outs, size_t count,
                  int nthreads) {
    threads_for(nthreads, 1);
    std::vector<char> whole(count);
    for (size_t i = 0; i < count; ++i) {
        check_inputs(ins[i]);
        whole[i] = (ins[i].n + kCombineBlock - 1) / kCombineBlock >= size_t(nthreads) && nthreads > 1;
    }
    run_many(count, nthreads, whole,
             [&](size_t i, int nt) { combine(ins[i], alphas[i], K, outs + i * size_t(K), nt); });
}

}  // namespace relex
