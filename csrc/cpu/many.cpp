// Many small tensors in one call: the engine's groups (relex_kernels/engine/streaming.py),
// for a MoE model's thousands of tensors, where one OpenMP region per tensor and per pass
// cost more than the tensor's bytes. A tensor of fewer Gram chunks (combine blocks) than
// threads runs whole on one thread, such tensors spread over the threads; a larger one runs
// alone with every thread. Neither gram() nor combine() depends on the thread count, so
// every tensor gets the bits of a call of its own.
//
// The small tensors go to the threads in runs of neighbours (about one chunk of elements
// each), not one by one: the tensors of a group lie one after another in each input file, and
// two threads reading neighbouring tensors of a memory map fault on the same pages (the kernel
// maps 64 KB around a fault): a 3072-tensor group of 16K-element tensors took 40K page faults
// on 2 threads against 26K on one thread, or for the same bytes in 24 large tensors.
#include <exception>
#include <vector>

#include "driver.h"

namespace relex {

namespace {

// Run f(i, threads) for each tensor: one with at least as many `unit`s of elements (Gram chunks,
// combine blocks) as threads runs alone with every thread; the others in parallel, one thread per
// run of neighbours of about one unit (a large tensor between them ends a run: its neighbours
// are not each other's). An exception is rethrown after the region.
template <class F>
void run_many(const Inputs* ins, size_t count, int nthreads, size_t unit, F f) {
    threads_for(nthreads, 1);  // a bad count is an error before any work
    for (size_t i = 0; i < count; ++i) check_inputs(ins[i]);
    std::vector<int64_t> small;
    std::vector<size_t> runs;  // run r: small[runs[r]] .. small[runs[r + 1]]
    size_t in_run = 0;
    for (size_t i = 0; i < count; ++i) {
        if (nthreads > 1 && (ins[i].n + unit - 1) / unit >= size_t(nthreads)) {
            f(i, nthreads);
            in_run = 0;
            continue;
        }
        if (in_run == 0) runs.push_back(small.size());
        small.push_back(int64_t(i));
        in_run += ins[i].n + 1;  // (+1: a run of empty tensors ends too)
        if (in_run >= unit) in_run = 0;
    }
    runs.push_back(small.size());
    const int64_t nruns = int64_t(runs.size()) - 1;
    const int nt = threads_for(nthreads, size_t(nruns));
    std::exception_ptr err;
#pragma omp parallel for schedule(dynamic, 1) num_threads(nt)
    for (int64_t r = 0; r < nruns; ++r) {
        try {
            for (size_t j = runs[size_t(r)]; j < runs[size_t(r) + 1]; ++j) f(size_t(small[j]), 1);
        } catch (...) {
#pragma omp critical(relex_many_error)
            if (!err) err = std::current_exception();
        }
    }
    if (err) std::rethrow_exception(err);
}

}  // namespace

void gram_many(const Inputs* ins, double* const* accs, size_t count, int nthreads) {
    run_many(ins, count, nthreads, kGramChunk, [&](size_t i, int nt) { gram(ins[i], accs[i], nt); });
}

void combine_many(const Inputs* ins, const float* const* alphas, int K, void* const* outs, size_t count,
                  int nthreads) {
    run_many(ins, count, nthreads, kCombineBlock,
             [&](size_t i, int nt) { combine(ins[i], alphas[i], K, outs + i * size_t(K), nt); });
}

}  // namespace relex
