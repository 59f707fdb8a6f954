// Run-time choice of the SIMD path: the best the CPU and the OS support, unless
// RELEX_SIMD (or set_active_isa) asks for a lower one.
#include <atomic>
#include <cstdlib>
#include <string>

#include "kernels.h"

#ifdef RELEX_X86_KERNELS
#include <cpuid.h>
#endif

namespace relex {
namespace {

struct Features {
    bool avx2 = false, fma = false, f16c = false;
    bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false, avx512bf16 = false;
    bool os_avx = false, os_avx512 = false;
};

#ifdef RELEX_X86_KERNELS
uint64_t xgetbv0() {
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return (uint64_t(hi) << 32) | lo;
}
#endif

Features detect() {
    Features f;
#ifdef RELEX_X86_KERNELS
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
    const bool osxsave = c & (1u << 27), avx = c & (1u << 28);
    f.fma = c & (1u << 12);
    f.f16c = c & (1u << 29);
    if (osxsave && avx) {
        const uint64_t xcr0 = xgetbv0();
        f.os_avx = (xcr0 & 0x6) == 0x6;               // XMM and YMM state
        f.os_avx512 = f.os_avx && (xcr0 & 0xE0) == 0xE0;  // opmask, ZMM0-15 high, ZMM16-31
    }
    if (__get_cpuid_max(0, nullptr) >= 7) {
        __cpuid_count(7, 0, a, b, c, d);
        f.avx2 = b & (1u << 5);
        f.avx512f = b & (1u << 16);
        f.avx512dq = b & (1u << 17);
        f.avx512bw = b & (1u << 30);
        f.avx512vl = b & (1u << 31);
        __cpuid_count(7, 1, a, b, c, d);
        f.avx512bf16 = a & (1u << 5);
    }
#endif
    return f;
}

const Features& features() {
    static const Features f = detect();
    return f;
}

Isa parse(const std::string& s, bool* ok) {
    *ok = true;
    if (s == "scalar") return Isa::kScalar;
    if (s == "avx2") return Isa::kAvx2;
    if (s == "avx512") return Isa::kAvx512;
    *ok = false;
    return Isa::kScalar;
}

// -1: not yet initialised from the environment
std::atomic<int> g_active{-1};

}  // namespace

const char* isa_name(Isa isa) {
    switch (isa) {
        case Isa::kAvx512: return "avx512";
        case Isa::kAvx2: return "avx2";
        default: return "scalar";
    }
}

Isa best_isa() {
    const Features& f = features();
    if (f.os_avx512 && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq && f.fma && f.f16c) return Isa::kAvx512;
    if (f.os_avx && f.avx2 && f.fma && f.f16c) return Isa::kAvx2;
    return Isa::kScalar;
}

bool set_active_isa(const std::string& name) {
    if (name == "auto" || name.empty()) {
        g_active = int(best_isa());
        return true;
    }
    bool ok;
    const Isa want = parse(name, &ok);
    if (!ok || int(want) > int(best_isa())) return false;
    g_active = int(want);
    return true;
}

Isa active_isa() {
    int v = g_active.load();
    if (v < 0) {
        const char* env = std::getenv("RELEX_SIMD");
        // an unusable RELEX_SIMD value falls back to auto; info() shows what was chosen
        if (!env || !set_active_isa(env)) set_active_isa("auto");
        v = g_active.load();
    }
    return Isa(v);
}

const IsaKernels& active_kernels() {
    switch (active_isa()) {
#ifdef RELEX_X86_KERNELS
        case Isa::kAvx512: return avx512_kernels();
        case Isa::kAvx2: return avx2_kernels();
#endif
        default: return scalar_kernels();
    }
}

std::string cpu_feature_list() {
    const Features& f = features();
    std::string s;
    auto add = [&](bool on, const char* name) {
        if (on) s += (s.empty() ? "" : " ") + std::string(name);
    };
    add(f.avx2, "avx2");
    add(f.fma, "fma");
    add(f.f16c, "f16c");
    add(f.avx512f, "avx512f");
    add(f.avx512bw, "avx512bw");
    add(f.avx512vl, "avx512vl");
    add(f.avx512dq, "avx512dq");
    add(f.avx512bf16, "avx512_bf16");
    add(f.os_avx, "os:ymm");
    add(f.os_avx512, "os:zmm");
    return s;
}

}  // namespace relex
