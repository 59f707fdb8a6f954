// Declarations of the __global__ kernels of kernels.cu (explicitly instantiated there),
// launched by ops.cu. See kernels.cu for what each computes.
#pragma once

#include <cstdint>

namespace relex_cuda {

// Gram partials: block (s, bi, bj) writes part[s] (T x T fp32, both triangles of the
// bi/bj tiles) for sub-chunk s = [s*kSub, (s+1)*kSub) of the block x (T+1 rows).
template <int T, int DT>
__global__ void gram_small_kernel(const void* x, int64_t stride, int64_t n, bool fp16, float* part);

template <int BT, int TM, int DT>
__global__ void gram_tile_kernel(const void* x, int64_t stride, int64_t n, int T, bool fp16, float* part);

template <int BT, bool X3, int DT>
__global__ void gram_tc_kernel(const void* x, int64_t stride, int64_t n, int T, bool fp16, float* part);

// acc[e] (fp64) += chunk partials in chunk order; each chunk partial = fp32 sum of its
// kSplit sub-partials in order.
__global__ void gram_reduce_kernel(const float* part, double* acc, int64_t TT, int64_t n_chunks);

// out[k][e] = round(b + ((0 + a_k0 d_0) + a_k1 d_1) + ...), no FMA, k < K <= KM
template <int DT, int KM>
__global__ void combine_kernel(const void* x, int64_t stride, int64_t n, int T, bool fp16, const float* alphas,
                               int K, void* out, int64_t out_stride);

// batched power iteration with deflation; one block per Gram (see ops/cuda.py)
__global__ void power_kernel(const double* G, const double* v0, double* work, double* lam, double* U,
                             int* status, int T, int R, int max_iter, double tol, double max_rate);

}  // namespace relex_cuda
