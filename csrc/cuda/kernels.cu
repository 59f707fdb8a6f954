// The __global__ kernels of the CUDA backend (launchers: ops.cu).
//
// Gram (the `gram` op of relex_kernels/ops/reference.py): a (T+1)-row block x (row 0
// the base, rows 1..T the history; row stride `stride` elements) starting at a chunk
// boundary of its tensor. Block (s, bi, bj) of the partial kernels covers sub-chunk s
// of kSub elements and the row tiles bi <= bj, forms the deltas on the fly and writes
// its fp32 product into part[s] (both triangles). gram_reduce_kernel then adds, per
// entry, the kSplit sub-partials of each chunk in fp32 in order and the chunk partials
// to the fp64 accumulator in chunk order: deterministic, no atomics, and independent
// of how a tensor is cut into blocks (blocks start at chunk boundaries).
//
//  * gram_small_kernel  T <= 8: every thread keeps the T(T+1)/2 products of its
//    elements in registers; a fixed-order tree in shared memory sums the block.
//  * gram_tile_kernel   fp32 FMA, BT x BT tile per block, BK-wide shared-memory steps.
//  * gram_tc_kernel     tensor cores (wmma m16n16k8 TF32), 1xTF32 or 3xTF32 (split
//    a = big + small, a·b ≈ small·big + big·small + big·big: near-fp32 products).
#include <cuda_fp16.h>
#include <mma.h>

#include "common.cuh"
#include "kernels.cuh"

namespace relex_cuda {

namespace {

template <int T, int DT>
__device__ __forceinline__ void small_accumulate(const void* x, int64_t stride, int64_t e, bool fp16, float* acc) {
    const float b = load_f32<DT>(x, e);
    float d[T];
#pragma unroll
    for (int i = 0; i < T; ++i) d[i] = delta(load_f32<DT>(x, (i + 1) * stride + e), b, fp16);
    int p = 0;
#pragma unroll
    for (int i = 0; i < T; ++i)
#pragma unroll
        for (int j = i; j < T; ++j) acc[p++] += d[i] * d[j];
}

__device__ __forceinline__ void store_tile_entry(float* part_s, int T, int i, int j, float v, bool mirror) {
    part_s[int64_t(i) * T + j] = v;
    if (mirror) part_s[int64_t(j) * T + i] = v;
}

// fp32 fragment -> its tf32 rounding ("big"), and with X3 the tf32 rounding of the rest
// ("small"): big + small carries ~21 bits, the 3xTF32 split.
template <bool X3, class Frag>
__device__ __forceinline__ void split_tf32(Frag& big, Frag& small) {
#pragma unroll
    for (int t = 0; t < big.num_elements; ++t) {
        const float v = big.x[t];
        const float b = nvcuda::wmma::__float_to_tf32(v);
        big.x[t] = b;
        if (X3) small.x[t] = nvcuda::wmma::__float_to_tf32(v - b);
    }
}

}  // namespace

template <int T, int DT>
__global__ void __launch_bounds__(256) gram_small_kernel(const void* x, int64_t stride, int64_t n, bool fp16,
                                                         float* part) {
    constexpr int TT = T * (T + 1) / 2;
    __shared__ float sh[TT][256];
    const int tid = threadIdx.x;
    const int64_t s = blockIdx.x;
    const int64_t start = s * kSub;
    const int64_t end = min(start + kSub, n);
    float acc[TT];
#pragma unroll
    for (int p = 0; p < TT; ++p) acc[p] = 0.f;
    for (int64_t e = start + tid; e < end; e += 256) small_accumulate<T, DT>(x, stride, e, fp16, acc);
#pragma unroll
    for (int p = 0; p < TT; ++p) sh[p][tid] = acc[p];
    __syncthreads();
    for (int w = 128; w > 0; w >>= 1) {
        if (tid < w) {
#pragma unroll
            for (int p = 0; p < TT; ++p) sh[p][tid] += sh[p][tid + w];
        }
        __syncthreads();
    }
    if (tid == 0) {
        float* out = part + s * T * T;
        int p = 0;
        for (int i = 0; i < T; ++i)
            for (int j = i; j < T; ++j) store_tile_entry(out, T, i, j, sh[p++][0], i != j);
    }
}

template <int BT, int TM, int DT>
__global__ void __launch_bounds__(256) gram_tile_kernel(const void* x, int64_t stride, int64_t n, int T, bool fp16,
                                                        float* part) {
    constexpr int BK = 32, NTH = 256, NX = BT / TM;
    static_assert(NX * NX == NTH, "one micro-tile per thread");
    const int bi = blockIdx.y, bj = blockIdx.z;
    if (bi > bj) return;
    const bool diag = bi == bj;
    __shared__ float bs[BK];
    __shared__ float di[BK][BT + 1];
    __shared__ float dj[BK][BT + 1];
    const int tid = threadIdx.x, ty = tid / NX, tx = tid % NX;
    const int64_t s = blockIdx.x;
    const int64_t start = s * kSub;
    const int64_t end = min(start + kSub, n);
    float acc[TM][TM];
#pragma unroll
    for (int a = 0; a < TM; ++a)
#pragma unroll
        for (int c = 0; c < TM; ++c) acc[a][c] = 0.f;
    for (int64_t k0 = start; k0 < end; k0 += BK) {
        if (tid < BK) bs[tid] = (k0 + tid < end) ? load_f32<DT>(x, k0 + tid) : 0.f;
        __syncthreads();
        for (int idx = tid; idx < BT * BK; idx += NTH) {
            const int r = idx / BK, c = idx % BK;
            const int64_t col = k0 + c;
            const int ri = bi * BT + r, rj = bj * BT + r;
            di[c][r] = (ri < T && col < end) ? delta(load_f32<DT>(x, (ri + 1) * stride + col), bs[c], fp16) : 0.f;
            if (!diag)
                dj[c][r] = (rj < T && col < end) ? delta(load_f32<DT>(x, (rj + 1) * stride + col), bs[c], fp16) : 0.f;
        }
        __syncthreads();
        const float(*dj_)[BT + 1] = diag ? di : dj;
#pragma unroll 8
        for (int k = 0; k < BK; ++k) {
            float ra[TM], rb[TM];
#pragma unroll
            for (int a = 0; a < TM; ++a) ra[a] = di[k][ty * TM + a];
#pragma unroll
            for (int c = 0; c < TM; ++c) rb[c] = dj_[k][tx * TM + c];
#pragma unroll
            for (int a = 0; a < TM; ++a)
#pragma unroll
                for (int c = 0; c < TM; ++c) acc[a][c] = fmaf(ra[a], rb[c], acc[a][c]);
        }
        __syncthreads();
    }
    float* out = part + s * T * T;
#pragma unroll
    for (int a = 0; a < TM; ++a)
#pragma unroll
        for (int c = 0; c < TM; ++c) {
            const int i = bi * BT + ty * TM + a, j = bj * BT + tx * TM + c;
            if (i < T && j < T) store_tile_entry(out, T, i, j, acc[a][c], !diag);
        }
}

template <int BT, bool X3, int DT>
__global__ void __launch_bounds__(128) gram_tc_kernel(const void* x, int64_t stride, int64_t n, int T, bool fp16,
                                                      float* part) {
    using namespace nvcuda;
    constexpr int BK = 32, LD = BK + 4, NTH = 128, WT = BT / 2, FR = WT / 16, OLD = BT + 4;
    static_assert(BT == 32 || BT == 64, "2 x 2 warps of 16-multiples");
    const int bi = blockIdx.y, bj = blockIdx.z;
    if (bi > bj) return;
    const bool diag = bi == bj;
    __shared__ float bs[BK];
    // the delta tiles, reused for the output tile at the end
    __shared__ __align__(32) float smem[(2 * BT * LD > BT * OLD) ? 2 * BT * LD : BT * OLD];
    float* di = smem;
    float* dj = diag ? smem : smem + BT * LD;
    const int tid = threadIdx.x, warp = tid / 32, wr = warp / 2, wc = warp % 2;
    const int64_t s = blockIdx.x;
    const int64_t start = s * kSub;
    const int64_t end = min(start + kSub, n);

    wmma::fragment<wmma::accumulator, 16, 16, 8, float> acc[FR][FR];
#pragma unroll
    for (int a = 0; a < FR; ++a)
#pragma unroll
        for (int c = 0; c < FR; ++c) wmma::fill_fragment(acc[a][c], 0.f);

    for (int64_t k0 = start; k0 < end; k0 += BK) {
        if (tid < BK) bs[tid] = (k0 + tid < end) ? load_f32<DT>(x, k0 + tid) : 0.f;
        __syncthreads();
        for (int idx = tid; idx < BT * BK; idx += NTH) {
            const int r = idx / BK, c = idx % BK;
            const int64_t col = k0 + c;
            const int ri = bi * BT + r, rj = bj * BT + r;
            di[r * LD + c] = (ri < T && col < end) ? delta(load_f32<DT>(x, (ri + 1) * stride + col), bs[c], fp16) : 0.f;
            if (!diag)
                dj[r * LD + c] =
                    (rj < T && col < end) ? delta(load_f32<DT>(x, (rj + 1) * stride + col), bs[c], fp16) : 0.f;
        }
        __syncthreads();
#pragma unroll
        for (int kk = 0; kk < BK; kk += 8) {
            wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> ab[FR], as[FR];
            wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::col_major> bb[FR], bsm[FR];
#pragma unroll
            for (int a = 0; a < FR; ++a) {
                wmma::load_matrix_sync(ab[a], di + (wr * WT + a * 16) * LD + kk, LD);
                split_tf32<X3>(ab[a], as[a]);
            }
#pragma unroll
            for (int c = 0; c < FR; ++c) {
                // B(k, col) = D_j[col][k]: column-major with leading dimension LD
                wmma::load_matrix_sync(bb[c], dj + (wc * WT + c * 16) * LD + kk, LD);
                split_tf32<X3>(bb[c], bsm[c]);
            }
#pragma unroll
            for (int a = 0; a < FR; ++a)
#pragma unroll
                for (int c = 0; c < FR; ++c) {
                    if (X3) {  // small terms first
                        wmma::mma_sync(acc[a][c], as[a], bb[c], acc[a][c]);
                        wmma::mma_sync(acc[a][c], ab[a], bsm[c], acc[a][c]);
                    }
                    wmma::mma_sync(acc[a][c], ab[a], bb[c], acc[a][c]);
                }
        }
        __syncthreads();
    }
    // through shared memory to the masked (and mirrored) partial
#pragma unroll
    for (int a = 0; a < FR; ++a)
#pragma unroll
        for (int c = 0; c < FR; ++c)
            wmma::store_matrix_sync(smem + (wr * WT + a * 16) * OLD + wc * WT + c * 16, acc[a][c], OLD,
                                    wmma::mem_row_major);
    __syncthreads();
    float* out = part + s * T * T;
    for (int idx = tid; idx < BT * BT; idx += NTH) {
        const int r = idx / BT, c = idx % BT;
        const int i = bi * BT + r, j = bj * BT + c;
        if (i < T && j < T) store_tile_entry(out, T, i, j, smem[r * OLD + c], !diag);
    }
}

__global__ void gram_reduce_kernel(const float* part, double* acc, int64_t TT, int64_t n_chunks) {
    const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
    if (e >= TT) return;
    double a = acc[e];
    for (int64_t c = 0; c < n_chunks; ++c) {
        const float* p = part + c * kSplit * TT + e;
        float q = p[0];
        for (int k = 1; k < kSplit; ++k) q = __fadd_rn(q, p[k * TT]);
        a += double(q);
    }
    acc[e] = a;
}

template <int DT, int KM>
__global__ void __launch_bounds__(256) combine_kernel(const void* x, int64_t stride, int64_t n, int T, bool fp16,
                                                      const float* alphas, int K, void* out, int64_t out_stride) {
    for (int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += int64_t(gridDim.x) * blockDim.x) {
        const float b = load_f32<DT>(x, e);
        float s[KM];
#pragma unroll
        for (int k = 0; k < KM; ++k) s[k] = 0.f;
        for (int i = 0; i < T; ++i) {
            const float d = delta(load_f32<DT>(x, (i + 1) * stride + e), b, fp16);
#pragma unroll
            for (int k = 0; k < KM; ++k)
                if (k < K) s[k] = __fadd_rn(s[k], __fmul_rn(__ldg(alphas + k * T + i), d));
        }
#pragma unroll
        for (int k = 0; k < KM; ++k)
            if (k < K) store_rounded<DT>(out, k * out_stride + e, __fadd_rn(b, s[k]));
    }
}

// Same algorithm and stopping rules as relex_kernels/kernels/triton/eig.py.
__global__ void __launch_bounds__(1024) power_kernel(const double* G, const double* v0, double* work, double* lam,
                                                     double* U, int* status, int T, int R, int max_iter,
                                                     double tol, double max_rate) {
    __shared__ double v[1024];
    __shared__ double red[32];
    const int64_t g = blockIdx.x;
    const int i = threadIdx.x;
    const bool in = i < T;
    const int64_t TT = int64_t(T) * T;
    const double* Gg = G + g * TT;
    double* A = work + g * TT;
    for (int64_t idx = i; idx < TT; idx += blockDim.x) {
        const int64_t r = idx / T, c = idx % T;
        A[idx] = 0.5 * (Gg[idx] + Gg[c * T + r]);
    }
    __syncthreads();
    const double scale = block_sum(in ? A[int64_t(i) * T + i] : 0.0, red);
    const double floor_ = scale * T * 1e-15;
    for (int k = 0; k < R; ++k) {
        double vi = in ? v0[(g * R + k) * T + i] : 0.0;
        const double nv = sqrt(block_sum(vi * vi, red));
        vi = nv > 0 ? vi / nv : (in ? 1.0 / sqrt(double(T)) : 0.0);
        double l = 0.0, prev = 1e300;
        int done = 0;
        for (int it = 0; it < max_iter && done == 0; ++it) {
            v[i] = vi;
            __syncthreads();
            double wi = 0.0;
            if (in)
                for (int j = 0; j < T; ++j) wi += A[int64_t(j) * T + i] * v[j];  // A symmetric: coalesced column
            l = block_sum(vi * wi, red);
            const double ri = wi - l * vi;
            const double res = sqrt(block_sum(ri * ri, red));
            const double nw = sqrt(block_sum(wi * wi, red));
            const bool conv = res <= tol * fabs(l) + floor_;
            const double vni = nw > 0 ? wi / nw : vi;
            const double step = sqrt(block_sum((vni - vi) * (vni - vi), red));
            const bool slow = it >= 8 && step > max_rate * prev;
            if (!conv) vi = vni;
            done = conv ? 1 : (slow ? 2 : 0);
            prev = step;
        }
        const double mx = block_max(fabs(vi), red);
        const double pick = block_max(fabs(vi) == mx ? vi : -1e300, red);
        if (pick < 0) vi = -vi;
        if (in) U[(g * R + k) * T + i] = vi;
        if (i == 0) {
            lam[g * R + k] = l;
            status[g * R + k] = done;
        }
        __syncthreads();
        v[i] = vi;
        __syncthreads();
        for (int64_t idx = i; idx < TT; idx += blockDim.x) A[idx] -= l * v[idx / T] * v[idx % T];
        __syncthreads();
    }
}

// ---- explicit instantiations (the launchers in ops.cu pick among these) ----------------
#define RELEX_SMALL(T, DT) template __global__ void gram_small_kernel<T, DT>(const void*, int64_t, int64_t, bool, float*);
#define RELEX_SMALL_DT(T) RELEX_SMALL(T, kF32) RELEX_SMALL(T, kF16) RELEX_SMALL(T, kBF16) RELEX_SMALL(T, kF64)
RELEX_SMALL_DT(1)
RELEX_SMALL_DT(2)
RELEX_SMALL_DT(3)
RELEX_SMALL_DT(4)
RELEX_SMALL_DT(5)
RELEX_SMALL_DT(6)
RELEX_SMALL_DT(7)
RELEX_SMALL_DT(8)

#define RELEX_TILE(BT, TM, DT) \
    template __global__ void gram_tile_kernel<BT, TM, DT>(const void*, int64_t, int64_t, int, bool, float*);
#define RELEX_TILE_DT(BT, TM) RELEX_TILE(BT, TM, kF32) RELEX_TILE(BT, TM, kF16) RELEX_TILE(BT, TM, kBF16) \
    RELEX_TILE(BT, TM, kF64)
RELEX_TILE_DT(16, 1)
RELEX_TILE_DT(32, 2)
RELEX_TILE_DT(64, 4)

#define RELEX_TC(BT, X3, DT) \
    template __global__ void gram_tc_kernel<BT, X3, DT>(const void*, int64_t, int64_t, int, bool, float*);
#define RELEX_TC_DT(BT, X3) RELEX_TC(BT, X3, kF32) RELEX_TC(BT, X3, kF16) RELEX_TC(BT, X3, kBF16) \
    RELEX_TC(BT, X3, kF64)
RELEX_TC_DT(32, false)
RELEX_TC_DT(32, true)
RELEX_TC_DT(64, false)
RELEX_TC_DT(64, true)

#define RELEX_COMBINE(DT, KM)                                                                             \
    template __global__ void combine_kernel<DT, KM>(const void*, int64_t, int64_t, int, bool, const float*, int, \
                                                    void*, int64_t);
#define RELEX_COMBINE_K(DT) RELEX_COMBINE(DT, 1) RELEX_COMBINE(DT, 2) RELEX_COMBINE(DT, 4) RELEX_COMBINE(DT, 8)
RELEX_COMBINE_K(kF32)
RELEX_COMBINE_K(kF16)
RELEX_COMBINE_K(kBF16)
RELEX_COMBINE_K(kF64)

}  // namespace relex_cuda
