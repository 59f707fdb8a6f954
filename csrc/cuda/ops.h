// Launchers of the CUDA kernels (ops.cu): raw device pointers, sizes, dtype codes and a
// cudaStream_t passed as an integer, so the Python binding needs no torch headers.
// Every launcher enqueues on `stream`, returns without synchronising, and returns a
// cudaError_t as int (0 = success) after checking its arguments.
#pragma once

#include <cstdint>
#include <string>

namespace relex_cuda {

enum Precision : int { kIeee = 0, kTf32x3 = 1, kTf32 = 2 };

// fp32 scratch elements `gram` needs for a block of n elements
int64_t gram_partials_numel(int T, int64_t n);

// acc (T x T fp64, device) += Gram of the block x: (T+1) rows of n elements of `dtype`,
// row stride `stride` elements; `part` holds gram_partials_numel(T, n) floats.
int gram(uintptr_t x, int64_t stride, int64_t n, int T, int dtype, bool fp16_deltas, uintptr_t acc,
         uintptr_t part, int precision, uintptr_t stream);

// out (K rows of `dtype`, row stride out_stride) = fused weighted sums; alphas (K, T) fp32
int combine(uintptr_t x, int64_t stride, int64_t n, int T, int dtype, bool fp16_deltas, uintptr_t alphas, int K,
            uintptr_t out, int64_t out_stride, uintptr_t stream);

// batched power iteration (B Grams of T x T fp64; work: B*T*T doubles; T <= 1024)
int power_iteration(uintptr_t G, uintptr_t v0, uintptr_t work, uintptr_t lam, uintptr_t U, uintptr_t status, int B,
                    int T, int R, int max_iter, double tol, double max_rate, uintptr_t stream);

// what "auto" precision means for T
int resolve_precision(int T, int precision);

const char* error_string(int err);
int device_count(int* count);
int device_name(int device, std::string* name, int* major, int* minor);
int runtime_version(int* version);
int driver_version(int* version);

}  // namespace relex_cuda
