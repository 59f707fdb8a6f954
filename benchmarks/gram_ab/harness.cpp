// A/B harness of the native Gram kernel: built against one copy of csrc/cpu by
// benchmarks/bench_gram_ab.py, it times relex::gram on one thread and prints a hash of the fp64
// Gram, so two builds (two commits) can be compared for speed and for identical bits.
//
//   harness ISA N REPEATS DTYPE_CODE T_LIST FP16_DELTAS
//   -> one line per T: "T <T> gflops <rate> hash <16 hex digits>"
#include <time.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <sstream>
#include <string>
#include <vector>

#include "dtype.h"
#include "kernels.h"

static double thread_seconds() {
    timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

int main(int argc, char** argv) {
    if (argc != 7) {
        std::fprintf(stderr, "usage: %s ISA N REPEATS DTYPE_CODE T_LIST FP16_DELTAS\n", argv[0]);
        return 2;
    }
    const std::string isa = argv[1];
    const size_t n = std::strtoull(argv[2], nullptr, 10);
    const int reps = std::atoi(argv[3]), dt = std::atoi(argv[4]);
    const bool f16 = std::atoi(argv[6]) != 0;
    if (!relex::set_active_isa(isa)) {
        std::fprintf(stderr, "unknown or unsupported ISA %s\n", isa.c_str());
        return 2;
    }
    std::vector<int> Ts;
    std::stringstream list(argv[5]);
    for (std::string t; std::getline(list, t, ',');) Ts.push_back(std::atoi(t.c_str()));
    uint64_t state = 1;  // a cheap LCG: the data only has to be the same for both builds
    auto uniform = [&state](int k) {  // an integer in [0, k)
        state = state * 6364136223846793005ull + 1442695040888963407ull;
        return int((state >> 33) % uint64_t(k));
    };
    const size_t isz = relex::dtype_size(dt);
    // base ~ U(-0.01, 0.01), each history row = base + U(-1e-3, 1e-3), stored in the dtype (isz
    // bytes each); made once for the largest T, each T runs on its first T + 1 rows
    const int Tmax = *std::max_element(Ts.begin(), Ts.end());
    std::vector<float> base(n);
    for (float& x : base) x = 0.01f * float(uniform(2001) - 1000) / 1000.f;
    std::vector<std::vector<unsigned char>> bufs(Tmax + 1, std::vector<unsigned char>(n * isz));
    for (int r = 0; r <= Tmax; ++r)
        for (size_t i = 0; i < n; ++i) {
            const float f = base[i] + (r ? 1e-3f * float(uniform(200) - 100) / 100.f : 0.f);
            unsigned char* p = bufs[r].data() + i * isz;
            if (dt == relex::kBF16) {
                const uint16_t v = relex::f32_to_bf16(f);
                std::memcpy(p, &v, 2);
            } else if (dt == relex::kF16) {
                const uint16_t v = relex::f32_to_f16(f);
                std::memcpy(p, &v, 2);
            } else if (dt == relex::kF32) {
                std::memcpy(p, &f, 4);
            } else {
                const double v = double(f) * 1.0000001;
                std::memcpy(p, &v, 8);
            }
        }
    for (int T : Ts) {
        std::vector<const void*> hist(T);
        for (int i = 0; i < T; ++i) hist[i] = bufs[i + 1].data();
        const relex::Inputs in{bufs[0].data(), hist.data(), T, dt, f16, n};
        std::vector<double> acc(size_t(T) * T), times;
        for (int k = 0; k < reps; ++k) {
            std::fill(acc.begin(), acc.end(), 0.0);
            // the calling thread's CPU time (the kernel runs on it: one thread), as
            // bench_gram_core times the extension: a shared VM's steal time is not the kernel's
            const double t0 = thread_seconds();
            relex::gram(in, acc.data(), 1);
            times.push_back(thread_seconds() - t0);
        }
        std::sort(times.begin(), times.end());
        uint64_t h = 1469598103934665603ull;  // FNV-1a over the Gram's bits
        for (double v : acc) {
            uint64_t b;
            std::memcpy(&b, &v, 8);
            h = (h ^ b) * 1099511628211ull;
        }
        std::printf("T %d gflops %.2f hash %016llx\n", T, double(T) * (T + 1) * n / times[times.size() / 2] / 1e9,
                    (unsigned long long)h);
    }
    return 0;
}
