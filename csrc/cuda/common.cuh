// Device helpers of the CUDA kernels: storage loads, the delta, exact roundings.
//
// Dtype codes match relex_kernels/io/dtypes.py DTYPE_CODES (and csrc/cpu/dtype.h).
// Every rounding is round-to-nearest-even and bit-identical to the numpy reference:
// bf16 and the fp16 NaN case by integer arithmetic (dtypes.from_float32), finite
// fp16 by __float2half_rn. Arithmetic that the contract fixes uses the explicit
// _rn intrinsics, which nvcc never contracts into FMAs.
#pragma once

#include <cuda_fp16.h>
#include <cstdint>

namespace relex_cuda {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2, kF64 = 3 };

constexpr int64_t kGramChunk = int64_t(1) << 16;  // must equal ops.reference.GRAM_CHUNK
constexpr int kSplit = 8;                         // sub-chunks per chunk (as the Triton kernel)
constexpr int64_t kSub = kGramChunk / kSplit;

template <int DT>
__device__ __forceinline__ float load_f32(const void* p, int64_t i);

template <>
__device__ __forceinline__ float load_f32<kF32>(const void* p, int64_t i) {
    return __ldg(static_cast<const float*>(p) + i);
}
template <>
__device__ __forceinline__ float load_f32<kF16>(const void* p, int64_t i) {
    return __half2float(__ushort_as_half(__ldg(static_cast<const unsigned short*>(p) + i)));
}
template <>
__device__ __forceinline__ float load_f32<kBF16>(const void* p, int64_t i) {
    return __uint_as_float(uint32_t(__ldg(static_cast<const unsigned short*>(p) + i)) << 16);
}
template <>
__device__ __forceinline__ float load_f32<kF64>(const void* p, int64_t i) {
    return __double2float_rn(__ldg(static_cast<const double*>(p) + i));
}

__device__ __forceinline__ float round_f16(float x) { return __half2float(__float2half_rn(x)); }

// d = h - b (one fp32 subtraction), or the authors' fp16 delta (a uniform branch)
__device__ __forceinline__ float delta(float h, float b, bool fp16) {
    if (fp16) return round_f16(__fsub_rn(round_f16(h), round_f16(b)));
    return __fsub_rn(h, b);
}

__device__ __forceinline__ unsigned short f32_to_bf16_bits(float x) {
    uint32_t u = __float_as_uint(x);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (unsigned short)((u >> 16) | 0x40u);
    return (unsigned short)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

__device__ __forceinline__ unsigned short f32_to_f16_bits(float x) {
    uint32_t u = __float_as_uint(x);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u)  // NaN: quiet, top payload kept (as numpy / F16C)
        return (unsigned short)(((u >> 16) & 0x8000u) | 0x7E00u | ((u >> 13) & 0x3FFu));
    return __half_as_ushort(__float2half_rn(x));
}

template <int DT>
__device__ __forceinline__ void store_rounded(void* p, int64_t i, float x);

template <>
__device__ __forceinline__ void store_rounded<kF32>(void* p, int64_t i, float x) {
    static_cast<float*>(p)[i] = x;
}
template <>
__device__ __forceinline__ void store_rounded<kF16>(void* p, int64_t i, float x) {
    static_cast<unsigned short*>(p)[i] = f32_to_f16_bits(x);
}
template <>
__device__ __forceinline__ void store_rounded<kBF16>(void* p, int64_t i, float x) {
    static_cast<unsigned short*>(p)[i] = f32_to_bf16_bits(x);
}
template <>
__device__ __forceinline__ void store_rounded<kF64>(void* p, int64_t i, float x) {
    static_cast<double*>(p)[i] = double(x);
}

// Sum of one value per thread over the block, in a fixed order (deterministic);
// every thread gets the result. `sh` holds blockDim.x / 32 doubles.
__device__ __forceinline__ double block_sum(double v, double* sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xFFFFFFFFu, v, o);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    __syncthreads();  // sh may still be read by a previous call
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    double t = 0.0;
    for (int w = 0; w < nw; ++w) t += sh[w];
    return t;
}

__device__ __forceinline__ double block_max(double v, double* sh) {
    for (int o = 16; o > 0; o >>= 1) v = fmax(v, __shfl_down_sync(0xFFFFFFFFu, v, o));
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    __syncthreads();
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    double t = sh[0];
    for (int w = 1; w < nw; ++w) t = fmax(t, sh[w]);
    return t;
}

}  // namespace relex_cuda
