// All eigenpairs of a stack of small symmetric matrices: the T x T Grams of a run's tensors.
//
// Why not LAPACK (numpy's eigh): a MoE group solves thousands of 16 x 16 Grams, and LAPACK's
// syevd spends most of its ~23 us per matrix in the calls between its BLAS-2 steps; the same
// two algorithms written out here take ~13 us, on every thread of the process without the GIL
// (3072 Grams at T = 16 on a 2-core Zen 4: numpy 84 ms in a run, here ~20 ms). Above ~48 rows
// LAPACK's blocked, divide-and-conquer path is faster on one core (T = 64: 1.3x, T = 128: 3.7x;
// benchmarks/results/eigh_cpu.md), and the solver's choice may not depend on the thread count
// (it decides the bits): the Python side calls this for T <= kEighMaxT only.
//
// The algorithms: Householder reduction to tridiagonal form with the transformations
// accumulated (EISPACK tred2), then the implicit QL iteration with Wilkinson shifts
// (EISPACK tql2), the family of LAPACK's steqr: backward stable, eigenvalues within a few
// ulps of ||G||, eigenvectors orthonormal to ~1e-15 (tests/test_native_eigh_and_text.py compares
// them with numpy's). The QL rotations are applied to the rows of Z = V^T, so that the inner
// loop runs over contiguous memory.
//
// Bits: each matrix is solved alone by the same sequence of IEEE operations (no FMA: the
// file is built with -ffp-contract=off and the baseline ISA; no reassociated sums), so its
// eigenpairs do not depend on the thread count, on its place in the stack or on the SIMD
// path the Gram kernels use.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <vector>

#include "driver.h"

namespace relex {

namespace {

// sqrt(a^2 + b^2) without std::hypot's cost (the QL loop's latency chain) where neither
// square can overflow or underflow; std::hypot at the extremes.
inline double safe_hypot(double a, double b) {
    a = std::fabs(a);
    b = std::fabs(b);
    const double hi = a > b ? a : b, lo = a > b ? b : a;
    if (hi < 1e150 && lo > 1e-150) return std::sqrt(a * a + b * b);
    if (lo == 0.0) return hi;
    return std::hypot(a, b);
}

// The QL iterations one eigenvalue may take before the matrix counts as not converged
// (EISPACK: 30; LAPACK: 30 per eigenvalue on average).
constexpr int kMaxIter = 60;

// A (n x n, row-major, symmetric: the lower triangle is read) -> w (ascending) and V
// (row-major; column j the unit eigenvector of w[j]). False when A holds a NaN or an infinity,
// the iteration did not converge or a result is not finite (w and V then undefined).
bool eigh_one(const double* A, int n, double* w, double* Vout, double* work) {
    double amax = 0.0;
    for (int i = 0; i < n * n; ++i) {
        if (!std::isfinite(A[i])) return false;
        amax = std::max(amax, std::fabs(A[i]));
    }
    // Solved scaled by a power of two to 1 <= max|a| < 2 (exact, and every step below is
    // homogeneous, so a matrix of ordinary scale gets the same bits either way): at the scales of
    // fp64 Grams (1e+-300) the QL step's product e[l+1]*e[l] overflowed to NaN or underflowed
    // (LAPACK's steqr scales too). The eigenvalues are scaled back at the end.
    const int ex = amax > 0.0 ? std::ilogb(amax) : 0;
    double* const V = work;  // n x n, then Z: n x n (the caller's scratch, 2 n^2 doubles)
    double* const Z = work + size_t(n) * size_t(n);
    double d[kEighMaxT], e[kEighMaxT];
    for (int i = 0; i < n * n; ++i) V[i] = std::ldexp(A[i], -ex);
    auto v = [&](int i, int j) -> double& { return V[i * n + j]; };

    // tred2: Householder reduction, row i = n-1 .. 1; d the diagonal, e the off-diagonal
    for (int j = 0; j < n; ++j) d[j] = v(n - 1, j);
    for (int i = n - 1; i > 0; --i) {
        double scale = 0.0, h = 0.0;
        for (int k = 0; k < i; ++k) scale += std::fabs(d[k]);
        if (scale == 0.0) {
            e[i] = d[i - 1];
            for (int j = 0; j < i; ++j) {
                d[j] = v(i - 1, j);
                v(i, j) = 0.0;
                v(j, i) = 0.0;
            }
        } else {
            for (int k = 0; k < i; ++k) {
                d[k] /= scale;
                h += d[k] * d[k];
            }
            double f = d[i - 1], g = std::sqrt(h);
            if (f > 0) g = -g;
            e[i] = scale * g;
            h -= f * g;
            d[i - 1] = f - g;
            for (int j = 0; j < i; ++j) e[j] = 0.0;
            for (int j = 0; j < i; ++j) {
                f = d[j];
                v(j, i) = f;
                g = e[j] + v(j, j) * f;
                for (int k = j + 1; k < i; ++k) {
                    g += v(k, j) * d[k];
                    e[k] += v(k, j) * f;
                }
                e[j] = g;
            }
            f = 0.0;
            for (int j = 0; j < i; ++j) {
                e[j] /= h;
                f += e[j] * d[j];
            }
            const double hh = f / (h + h);
            for (int j = 0; j < i; ++j) e[j] -= hh * d[j];
            for (int j = 0; j < i; ++j) {
                f = d[j];
                g = e[j];
                for (int k = j; k < i; ++k) v(k, j) -= (f * e[k] + g * d[k]);
                d[j] = v(i - 1, j);
                v(i, j) = 0.0;
            }
        }
        d[i] = h;
    }
    // the accumulated transformations
    for (int i = 0; i < n - 1; ++i) {
        v(n - 1, i) = v(i, i);
        v(i, i) = 1.0;
        const double h = d[i + 1];
        if (h != 0.0) {
            for (int k = 0; k <= i; ++k) d[k] = v(k, i + 1) / h;
            for (int j = 0; j <= i; ++j) {
                double g = 0.0;
                for (int k = 0; k <= i; ++k) g += v(k, i + 1) * v(k, j);
                for (int k = 0; k <= i; ++k) v(k, j) -= g * d[k];
            }
        }
        for (int k = 0; k <= i; ++k) v(k, i + 1) = 0.0;
    }
    for (int j = 0; j < n; ++j) {
        d[j] = v(n - 1, j);
        v(n - 1, j) = 0.0;
    }
    v(n - 1, n - 1) = 1.0;
    e[0] = 0.0;
    for (int i = 0; i < n; ++i)
        for (int k = 0; k < n; ++k) Z[i * n + k] = v(k, i);

    // tql2: implicit QL with Wilkinson shifts; an off-diagonal entry counts as zero below
    // eps times the largest |d| + |e| met so far
    for (int i = 1; i < n; ++i) e[i - 1] = e[i];
    e[n - 1] = 0.0;
    double f = 0.0, tst1 = 0.0;
    const double eps = std::ldexp(1.0, -52);
    for (int l = 0; l < n; ++l) {
        tst1 = std::max(tst1, std::fabs(d[l]) + std::fabs(e[l]));
        int m = l;
        while (m < n - 1 && std::fabs(e[m]) > eps * tst1) ++m;  // (e[n-1] = 0 ends it)
        if (m > l) {
            int iter = 0;
            do {
                if (++iter > kMaxIter) return false;
                double g = d[l];
                double p = (d[l + 1] - g) / (2.0 * e[l]);
                double r = safe_hypot(p, 1.0);
                if (p < 0) r = -r;
                d[l] = e[l] / (p + r);
                d[l + 1] = e[l] * (p + r);
                const double dl1 = d[l + 1];
                double h = g - d[l];
                for (int i = l + 2; i < n; ++i) d[i] -= h;
                f += h;
                p = d[m];
                double c = 1.0, c2 = c, c3 = c, s = 0.0, s2 = 0.0;
                const double el1 = e[l + 1];
                for (int i = m - 1; i >= l; --i) {
                    c3 = c2;
                    c2 = c;
                    s2 = s;
                    g = c * e[i];
                    h = c * p;
                    r = safe_hypot(p, e[i]);
                    e[i + 1] = s * r;
                    s = e[i] / r;
                    c = p / r;
                    p = c * d[i] - s * g;
                    d[i + 1] = h + s * (c * g + s * d[i]);
                    double* zi = Z + i * n;
                    double* zj = Z + (i + 1) * n;
                    for (int k = 0; k < n; ++k) {
                        const double zk = zj[k];
                        zj[k] = s * zi[k] + c * zk;
                        zi[k] = c * zi[k] - s * zk;
                    }
                }
                p = -s * s2 * c3 * el1 * e[l] / dl1;
                e[l] = s * p;
                d[l] = c * p;
            } while (std::fabs(e[l]) > eps * tst1);
        }
        d[l] += f;
        e[l] = 0.0;
    }
    for (int i = 0; i < n; ++i)
        if (!std::isfinite(d[i])) return false;
    for (int i = 0; i < n * n; ++i)
        if (!std::isfinite(Z[i])) return false;
    // ascending (a selection sort: ties in a fixed, not the original, order)
    int idx[kEighMaxT];
    for (int i = 0; i < n; ++i) idx[i] = i;
    for (int i = 0; i < n - 1; ++i) {
        int k = i;
        for (int j = i + 1; j < n; ++j)
            if (d[idx[j]] < d[idx[k]]) k = j;
        std::swap(idx[i], idx[k]);
    }
    for (int j = 0; j < n; ++j) {
        w[j] = std::ldexp(d[idx[j]], ex);
        const double* z = Z + idx[j] * n;
        for (int k = 0; k < n; ++k) Vout[k * n + j] = z[k];
    }
    return std::isfinite(w[0]) && std::isfinite(w[n - 1]);  // (scaled back past float64's range)
}

}  // namespace

void eigh_small(const double* A, size_t count, int n, double* w, double* V, uint8_t* ok, int nthreads) {
    if (n < 1 || n > kEighMaxT)
        throw std::invalid_argument("eigh_small: matrices of 1 to " + std::to_string(kEighMaxT) + " rows, got " +
                                    std::to_string(n));
    if (count && (!A || !w || !V || !ok)) throw std::invalid_argument("eigh_small: null pointer");
    const size_t nn = size_t(n) * size_t(n);
    // a few dozen small matrices per thread at least (below that, starting threads costs more);
    // from T = 32 on, every matrix is worth a thread
    const int nt = threads_for(nthreads, n >= 32 ? count : count / 32);
    // each thread's scratch (V and Z), on the heap rather than the stack of whatever thread calls
    // (36 KB at T = 48), allocated before the parallel region (an exception must not escape it)
    std::vector<double> work(size_t(nt) * 2 * nn);
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t b = 0; b < int64_t(count); ++b)
        ok[b] = uint8_t(eigh_one(A + size_t(b) * nn, n, w + size_t(b) * size_t(n), V + size_t(b) * nn,
                                 work.data() + size_t(thread_id()) * 2 * nn));
}

}  // namespace relex
