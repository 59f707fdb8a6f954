// Launchers of the kernels of kernels.cu: argument checks, kernel and launch-shape
// choice. Nothing here allocates, copies or synchronises: the caller (the Python
// pipeline) owns memory and streams.
#include <cuda_runtime.h>

#include <algorithm>

#include "common.cuh"
#include "kernels.cuh"
#include "ops.h"

namespace relex_cuda {

namespace {

inline bool valid_dtype(int dt) { return dt >= kF32 && dt <= kF64; }
inline int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline cudaStream_t as_stream(uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }
inline int launched() { return int(cudaGetLastError()); }

template <int T, int DT>
void launch_small(const void* x, int64_t stride, int64_t n, bool fp16, float* part, int64_t n_sub, cudaStream_t st) {
    gram_small_kernel<T, DT><<<unsigned(n_sub), 256, 0, st>>>(x, stride, n, fp16, part);
}

template <int DT>
void small_by_T(int T, const void* x, int64_t stride, int64_t n, bool fp16, float* part, int64_t n_sub,
                cudaStream_t st) {
    switch (T) {
        case 1: launch_small<1, DT>(x, stride, n, fp16, part, n_sub, st); break;
        case 2: launch_small<2, DT>(x, stride, n, fp16, part, n_sub, st); break;
        case 3: launch_small<3, DT>(x, stride, n, fp16, part, n_sub, st); break;
        case 4: launch_small<4, DT>(x, stride, n, fp16, part, n_sub, st); break;
        case 5: launch_small<5, DT>(x, stride, n, fp16, part, n_sub, st); break;
        case 6: launch_small<6, DT>(x, stride, n, fp16, part, n_sub, st); break;
        case 7: launch_small<7, DT>(x, stride, n, fp16, part, n_sub, st); break;
        default: launch_small<8, DT>(x, stride, n, fp16, part, n_sub, st); break;
    }
}

template <int BT, int TM, int DT>
void launch_tile(const void* x, int64_t stride, int64_t n, int T, bool fp16, float* part, int64_t n_sub,
                 cudaStream_t st) {
    const unsigned nb = unsigned(cdiv(T, BT));
    gram_tile_kernel<BT, TM, DT><<<dim3(unsigned(n_sub), nb, nb), 256, 0, st>>>(x, stride, n, T, fp16, part);
}

template <int BT, bool X3, int DT>
void launch_tc(const void* x, int64_t stride, int64_t n, int T, bool fp16, float* part, int64_t n_sub,
               cudaStream_t st) {
    const unsigned nb = unsigned(cdiv(T, BT));
    gram_tc_kernel<BT, X3, DT><<<dim3(unsigned(n_sub), nb, nb), 128, 0, st>>>(x, stride, n, T, fp16, part);
}

template <int DT>
void gram_dt(const void* x, int64_t stride, int64_t n, int T, bool fp16, float* part, int prec, int64_t n_sub,
             cudaStream_t st) {
    if (T <= 8) return small_by_T<DT>(T, x, stride, n, fp16, part, n_sub, st);
    if (prec == kIeee) {
        if (T <= 16) return launch_tile<16, 1, DT>(x, stride, n, T, fp16, part, n_sub, st);
        if (T <= 32) return launch_tile<32, 2, DT>(x, stride, n, T, fp16, part, n_sub, st);
        return launch_tile<64, 4, DT>(x, stride, n, T, fp16, part, n_sub, st);
    }
    const bool x3 = prec == kTf32x3;
    if (T <= 32) {
        if (x3) return launch_tc<32, true, DT>(x, stride, n, T, fp16, part, n_sub, st);
        return launch_tc<32, false, DT>(x, stride, n, T, fp16, part, n_sub, st);
    }
    if (x3) return launch_tc<64, true, DT>(x, stride, n, T, fp16, part, n_sub, st);
    return launch_tc<64, false, DT>(x, stride, n, T, fp16, part, n_sub, st);
}

template <int DT>
void combine_dt(bool fp16, const void* x, int64_t stride, int64_t n, int T, const float* a, int K, void* out,
                int64_t out_stride, cudaStream_t st) {
    const unsigned blocks = unsigned(std::min<int64_t>(cdiv(n, 256), int64_t(1) << 20));
    if (K <= 1)
        combine_kernel<DT, 1><<<blocks, 256, 0, st>>>(x, stride, n, T, fp16, a, K, out, out_stride);
    else if (K <= 2)
        combine_kernel<DT, 2><<<blocks, 256, 0, st>>>(x, stride, n, T, fp16, a, K, out, out_stride);
    else if (K <= 4)
        combine_kernel<DT, 4><<<blocks, 256, 0, st>>>(x, stride, n, T, fp16, a, K, out, out_stride);
    else
        combine_kernel<DT, 8><<<blocks, 256, 0, st>>>(x, stride, n, T, fp16, a, K, out, out_stride);
}

}  // namespace

int resolve_precision(int T, int precision) {
    if (precision >= 0) return precision;
    return T <= 16 ? kIeee : kTf32x3;
}

int64_t gram_partials_numel(int T, int64_t n) { return cdiv(n, kGramChunk) * kSplit * int64_t(T) * T; }

int gram(uintptr_t x, int64_t stride, int64_t n, int T, int dtype, bool fp16_deltas, uintptr_t acc,
         uintptr_t part, int precision, uintptr_t stream) {
    if (T < 1 || n < 0 || stride < n || !valid_dtype(dtype) || precision > kTf32 || !x || !acc || !part)
        return int(cudaErrorInvalidValue);
    if (n == 0) return 0;
    const int prec = resolve_precision(T, precision);
    const int64_t n_sub = cdiv(n, kGramChunk) * kSplit;
    const void* xp = reinterpret_cast<const void*>(x);
    float* pp = reinterpret_cast<float*>(part);
    cudaStream_t st = as_stream(stream);
    switch (dtype) {
        case kF32: gram_dt<kF32>(xp, stride, n, T, fp16_deltas, pp, prec, n_sub, st); break;
        case kF16: gram_dt<kF16>(xp, stride, n, T, fp16_deltas, pp, prec, n_sub, st); break;
        case kBF16: gram_dt<kBF16>(xp, stride, n, T, fp16_deltas, pp, prec, n_sub, st); break;
        default: gram_dt<kF64>(xp, stride, n, T, fp16_deltas, pp, prec, n_sub, st); break;
    }
    if (int e = launched()) return e;
    const int64_t TT = int64_t(T) * T;
    gram_reduce_kernel<<<unsigned(cdiv(TT, 256)), 256, 0, st>>>(pp, reinterpret_cast<double*>(acc), TT,
                                                                 cdiv(n, kGramChunk));
    return launched();
}

int combine(uintptr_t x, int64_t stride, int64_t n, int T, int dtype, bool fp16_deltas, uintptr_t alphas, int K,
            uintptr_t out, int64_t out_stride, uintptr_t stream) {
    if (T < 1 || n < 0 || stride < n || out_stride < n || K < 1 || !valid_dtype(dtype) || !x || !alphas || !out)
        return int(cudaErrorInvalidValue);
    if (n == 0) return 0;
    const int isz = dtype == kF64 ? 8 : dtype == kF32 ? 4 : 2;
    cudaStream_t st = as_stream(stream);
    // at most 8 sums per pass over the data
    for (int k0 = 0; k0 < K; k0 += 8) {
        const int k = std::min(8, K - k0);
        const void* xp = reinterpret_cast<const void*>(x);
        const float* a = reinterpret_cast<const float*>(alphas) + int64_t(k0) * T;
        void* o = reinterpret_cast<void*>(out + uintptr_t(k0 * out_stride * isz));
        switch (dtype) {
            case kF32: combine_dt<kF32>(fp16_deltas, xp, stride, n, T, a, k, o, out_stride, st); break;
            case kF16: combine_dt<kF16>(fp16_deltas, xp, stride, n, T, a, k, o, out_stride, st); break;
            case kBF16: combine_dt<kBF16>(fp16_deltas, xp, stride, n, T, a, k, o, out_stride, st); break;
            default: combine_dt<kF64>(fp16_deltas, xp, stride, n, T, a, k, o, out_stride, st); break;
        }
        if (int e = launched()) return e;
    }
    return 0;
}

int power_iteration(uintptr_t G, uintptr_t v0, uintptr_t work, uintptr_t lam, uintptr_t U, uintptr_t status, int B,
                    int T, int R, int max_iter, double tol, double max_rate, uintptr_t stream) {
    if (B < 0 || T < 1 || T > 1024 || R < 1 || R > T || max_iter < 1 || !G || !v0 || !work || !lam || !U || !status)
        return int(cudaErrorInvalidValue);
    if (B == 0) return 0;
    const unsigned threads = unsigned(cdiv(T, 32) * 32);
    power_kernel<<<unsigned(B), threads, 0, as_stream(stream)>>>(
        reinterpret_cast<const double*>(G), reinterpret_cast<const double*>(v0), reinterpret_cast<double*>(work),
        reinterpret_cast<double*>(lam), reinterpret_cast<double*>(U), reinterpret_cast<int*>(status), T, R,
        max_iter, tol, max_rate);
    return launched();
}

const char* error_string(int err) { return cudaGetErrorString(cudaError_t(err)); }

int device_count(int* count) {
    *count = 0;
    cudaError_t e = cudaGetDeviceCount(count);
    if (e != cudaSuccess) *count = 0;
    return int(e);
}

int device_name(int device, std::string* name, int* major, int* minor) {
    cudaDeviceProp p;
    cudaError_t e = cudaGetDeviceProperties(&p, device);
    if (e != cudaSuccess) return int(e);
    *name = p.name;
    *major = p.major;
    *minor = p.minor;
    return 0;
}

int runtime_version(int* version) { return int(cudaRuntimeGetVersion(version)); }
int driver_version(int* version) { return int(cudaDriverGetVersion(version)); }

}  // namespace relex_cuda
