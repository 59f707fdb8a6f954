// Interface between the threaded drivers (gram.cpp, combine.cpp) and the
// per-ISA tile kernels (kernels_{scalar,avx2,avx512}.cpp).
//
// A tile kernel works on one thread's share: one GRAM_CHUNK for gram, one block
// of elements for combine. The drivers own threading, chunk order and the fp64
// reduction, so every ISA inherits the same determinism guarantees.
#pragma once

#include <cstddef>
#include <cstdint>
#include <string>

// x86-64 gets the AVX2 and AVX-512 kernels; RELEX_PORTABLE_ONLY builds what every
// other architecture (aarch64) builds, to test that path on x86 too.
#if (defined(__x86_64__) || defined(_M_X64)) && !defined(RELEX_PORTABLE_ONLY)
#define RELEX_X86_KERNELS 1
#endif

namespace relex {

constexpr size_t kGramChunk = size_t(1) << 16;  // must equal reference.GRAM_CHUNK

// The raw inputs of one element range: base + T history buffers of n elements.
struct Inputs {
    const void* base;
    const void* const* hist;  // T pointers
    int T;
    int dtype;
    bool fp16_deltas;
    size_t n;
};

// Scratch floats one thread needs for gram / combine tiles of T rows (range of n).
struct Plan {
    size_t scratch_floats;
};

struct IsaKernels {
    const char* name;
    int lanes;  // fp32 lanes of one vector
    Plan (*gram_plan)(int T, size_t n);
    // out[T*T] (fp32, full symmetric) = Gram of elements [off, off+len), len <= kGramChunk
    void (*gram_chunk)(const Inputs& in, size_t off, size_t len, float* out, float* scratch);
    Plan (*combine_plan)(int T, size_t n);
    // outs[k][off:off+len] = round(b + sum_i alphas[k*T+i] * d_i), left to right, no FMA
    void (*combine_block)(const Inputs& in, size_t off, size_t len, const float* alphas, int K,
                          void* const* outs, float* scratch);
    uint64_t (*xor_words)(const void* p, size_t nbytes);  // the read-bandwidth probe's loop
};

enum class Isa : int { kScalar = 0, kAvx2 = 1, kAvx512 = 2 };

const IsaKernels& scalar_kernels();
#ifdef RELEX_X86_KERNELS
const IsaKernels& avx2_kernels();
const IsaKernels& avx512_kernels();
#endif

// cpu_features.cpp
Isa best_isa();                      // what this CPU (and OS) supports
Isa active_isa();                    // best_isa(), or the override
bool set_active_isa(const std::string& name);  // "auto", "scalar", "avx2", "avx512"
const IsaKernels& active_kernels();
const char* isa_name(Isa isa);
std::string cpu_feature_list();      // the flags that were looked at, "avx2 fma ..."

// gram.cpp / combine.cpp: validated entry points (throw std::invalid_argument)
void gram(const Inputs& in, double* acc, int nthreads);
void combine(const Inputs& in, const float* alphas, int K, void* const* outs, int nthreads);

// A range whose versions are held in pieces (a tensor assembled from several files: FSDP rank
// files, DCP chunks): piece p is elements [starts[p], starts[p + 1]) of the range (starts[0] = 0,
// starts[count] = n), version v of it (0 the base, 1..T the history) at rows[p * (T + 1) + v].
struct Pieces {
    const size_t* starts;  // count + 1 entries
    const void* const* rows;  // count * (T + 1) entries
    size_t count;
};

// gram() / combine() of such a range (in.base and in.hist unused), with the same bits as one call
// over the range stored contiguously, on every thread: a tensor's range is one call however many
// files hold it. gram_pieces needs every piece to start on a kGramChunk edge (a chunk across two
// files is gathered by the caller); combine_pieces takes any pieces and contiguous outs.
void gram_pieces(const Inputs& in, const Pieces& pc, double* acc, int nthreads);
void combine_pieces(const Inputs& in, const Pieces& pc, const float* alphas, int K, void* const* outs, int nthreads);
uint64_t read_probe(const void* const* bufs, int nbuf, size_t nbytes, int nthreads);
// many.cpp: gram()/combine() of `count` tensors in one call (tensor i: ins[i], accs[i] or
// alphas[i] and outs[i*K .. i*K+K)), each with the bits of its own call
void gram_many(const Inputs* ins, double* const* accs, size_t count, int nthreads);
void combine_many(const Inputs* ins, const float* const* alphas, int K, void* const* outs, size_t count,
                  int nthreads);

// eigh.cpp: all eigenpairs of `count` symmetric n x n float64 matrices (row-major, the lower
// triangle read), n <= kEighMaxT: w[b] ascending, V[b] row-major with column j the eigenvector
// of w[b][j]; ok[b] = 0 where matrix b holds a non-finite value or did not converge
constexpr int kEighMaxT = 48;
void eigh_small(const double* A, size_t count, int n, double* w, double* V, uint8_t* ok, int nthreads);

// float_text.cpp: x as Python's repr() writes it (JSON's NaN, Infinity, -Infinity for the
// others), appended to out; only where float_text_supported() (else it throws)
bool float_text_supported();
void append_float_text(double x, std::string& out);

}  // namespace relex
