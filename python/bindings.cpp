// relex_kernels._C: the pybind11 face of the CPU kernels.
//
// Free of torch's C++ ABI on purpose: buffers are passed as integer addresses
// (numpy `arr.ctypes.data`, torch `t.data_ptr()`), sizes as element counts and
// storage dtypes as the codes of relex_kernels/io/dtypes.py (F32=0, F16=1,
// BF16=2, F64=3). Validation of shapes and dtypes is the Python wrapper's job
// (relex_kernels/ops/native.py); here only what would crash is checked. Every
// kernel releases the GIL.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "../csrc/cpu/kernels.h"

namespace py = pybind11;
using relex::Inputs;

namespace {

template <class T>
T* ptr(uintptr_t p) {
    return reinterpret_cast<T*>(p);
}

std::vector<const void*> const_ptrs(const std::vector<uintptr_t>& v) {
    std::vector<const void*> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = ptr<const void>(v[i]);
    return out;
}

void gram(uintptr_t base, const std::vector<uintptr_t>& hist, size_t n, int dtype, uintptr_t acc,
          bool fp16_deltas, int num_threads) {
    const std::vector<const void*> h = const_ptrs(hist);
    const Inputs in{ptr<const void>(base), h.data(), int(h.size()), dtype, fp16_deltas, n};
    relex::gram(in, ptr<double>(acc), num_threads);
}

void combine(uintptr_t base, const std::vector<uintptr_t>& hist, size_t n, int dtype, uintptr_t alphas,
             const std::vector<uintptr_t>& outs, bool fp16_deltas, int num_threads) {
    const std::vector<const void*> h = const_ptrs(hist);
    std::vector<void*> o(outs.size());
    for (size_t k = 0; k < outs.size(); ++k) o[k] = ptr<void>(outs[k]);
    const Inputs in{ptr<const void>(base), h.data(), int(h.size()), dtype, fp16_deltas, n};
    relex::combine(in, ptr<const float>(alphas), int(o.size()), o.data(), num_threads);
}

// A range held in pieces (relex_kernels/ops/native.py gram_pieces / combine_pieces): `count` + 1
// uint64 piece starts at `starts`, count x (T + 1) uint64 row addresses at `rows`.
relex::Pieces pieces_at(uintptr_t starts, uintptr_t rows, size_t count) {
    static_assert(sizeof(size_t) == sizeof(uint64_t) && sizeof(void*) == sizeof(uint64_t), "64-bit tables");
    return relex::Pieces{ptr<const size_t>(starts), ptr<const void* const>(rows), count};
}

void gram_pieces(uintptr_t starts, uintptr_t rows, size_t count, int T, size_t n, int dtype, uintptr_t acc,
                 bool fp16_deltas, int num_threads) {
    const Inputs in{nullptr, nullptr, T, dtype, fp16_deltas, n};
    relex::gram_pieces(in, pieces_at(starts, rows, count), ptr<double>(acc), num_threads);
}

void combine_pieces(uintptr_t starts, uintptr_t rows, size_t count, int T, size_t n, int dtype, uintptr_t alphas,
                    const std::vector<uintptr_t>& outs, bool fp16_deltas, int num_threads) {
    std::vector<void*> o(outs.size());
    for (size_t k = 0; k < outs.size(); ++k) o[k] = ptr<void>(outs[k]);
    const Inputs in{nullptr, nullptr, T, dtype, fp16_deltas, n};
    relex::combine_pieces(in, pieces_at(starts, rows, count), ptr<const float>(alphas), int(o.size()), o.data(),
                          num_threads);
}

// Tables of many tensors (relex_kernels/ops/native.py gram_table / combine_table): `count`
// rows of uint64 at address `table`: n, dtype code, acc (gram) or alphas (combine: K x T
// float32), base, T history addresses, then (combine) K output addresses.
struct Table {
    std::vector<const void*> hist;
    std::vector<Inputs> ins;
    std::vector<uintptr_t> third;  // acc or alphas of each row
    std::vector<void*> outs;
};

Table read_table(uintptr_t table, size_t count, int T, int K, bool fp16_deltas) {
    const uint64_t* t = ptr<const uint64_t>(table);
    const size_t cols = size_t(4 + T + K);
    Table tb;
    tb.hist.resize(count * size_t(T));
    tb.ins.resize(count);
    tb.third.resize(count);
    tb.outs.resize(count * size_t(K));
    for (size_t i = 0; i < count; ++i) {
        const uint64_t* row = t + i * cols;
        for (int j = 0; j < T; ++j) tb.hist[i * size_t(T) + size_t(j)] = ptr<const void>(uintptr_t(row[4 + j]));
        for (int k = 0; k < K; ++k) tb.outs[i * size_t(K) + size_t(k)] = ptr<void>(uintptr_t(row[4 + T + k]));
        tb.third[i] = uintptr_t(row[2]);
        tb.ins[i] = Inputs{ptr<const void>(uintptr_t(row[3])), tb.hist.data() + i * size_t(T), T, int(row[1]),
                           fp16_deltas, size_t(row[0])};
    }
    return tb;
}

void gram_table(uintptr_t table, size_t count, int T, bool fp16_deltas, int num_threads) {
    Table tb = read_table(table, count, T, 0, fp16_deltas);
    std::vector<double*> accs(count);
    for (size_t i = 0; i < count; ++i) accs[i] = ptr<double>(tb.third[i]);
    relex::gram_many(tb.ins.data(), accs.data(), count, num_threads);
}

void combine_table(uintptr_t table, size_t count, int T, int K, bool fp16_deltas, int num_threads) {
    Table tb = read_table(table, count, T, K, fp16_deltas);
    std::vector<const float*> alphas(count);
    for (size_t i = 0; i < count; ++i) alphas[i] = ptr<const float>(tb.third[i]);
    relex::combine_many(tb.ins.data(), alphas.data(), K, tb.outs.data(), count, num_threads);
}

void eigh_small(uintptr_t a, size_t count, int n, uintptr_t w, uintptr_t v, uintptr_t ok, int num_threads) {
    relex::eigh_small(ptr<const double>(a), count, n, ptr<double>(w), ptr<double>(v), ptr<uint8_t>(ok), num_threads);
}

// Each row of a rows x cols float64 array (C order) as text, its values as Python's repr()
// writes them, separated by ", " (json.dumps's list separator).
py::list float_rows_text(uintptr_t addr, size_t rows, size_t cols) {
    const double* x = ptr<const double>(addr);
    py::list out(rows);
    std::string s;
    for (size_t r = 0; r < rows; ++r) {
        s.clear();
        for (size_t c = 0; c < cols; ++c) {
            if (c) s += ", ";
            relex::append_float_text(x[r * cols + c], s);
        }
        out[r] = py::str(s);
    }
    return out;
}

uint64_t read_probe(const std::vector<uintptr_t>& bufs, size_t nbytes, int num_threads) {
    const std::vector<const void*> b = const_ptrs(bufs);
    return relex::read_probe(b.data(), int(b.size()), nbytes, num_threads);
}

int max_threads() {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

py::dict build_info() {
    py::dict d;
#if defined(__clang__)
    d["compiler"] = std::string("clang ") + __clang_version__;
#elif defined(__GNUC__)
    d["compiler"] = std::string("gcc ") + __VERSION__;
#else
    d["compiler"] = "unknown";
#endif
#ifdef _OPENMP
    d["openmp"] = int(_OPENMP);
#else
    d["openmp"] = py::none();
#endif
#ifdef RELEX_X86_KERNELS
    d["simd_paths"] = py::make_tuple("scalar", "avx2", "avx512");
#else
    d["simd_paths"] = py::make_tuple("scalar");
#endif
    return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
    m.doc() = "relex_kernels native CPU kernels (see relex_kernels.ops.native for the typed API)";
    m.attr("GRAM_CHUNK") = py::int_(relex::kGramChunk);

    m.def("gram", &gram, py::arg("base"), py::arg("hist"), py::arg("n"), py::arg("dtype"), py::arg("acc"),
          py::arg("fp16_deltas"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
          "acc (T*T float64 at address acc) += Gram of the deltas of n elements; base and hist[i]\n"
          "are addresses of n raw elements of dtype code `dtype` (unaligned allowed).");
    m.def("combine", &combine, py::arg("base"), py::arg("hist"), py::arg("n"), py::arg("dtype"),
          py::arg("alphas"), py::arg("outs"), py::arg("fp16_deltas"), py::arg("num_threads"),
          py::call_guard<py::gil_scoped_release>(),
          "outs[k] (n raw elements each) = round(b + sum_i alphas[k, i] * d_i); alphas is the\n"
          "address of len(outs) x len(hist) float32, C order.");
    m.def("gram_pieces", &gram_pieces, py::arg("starts"), py::arg("rows"), py::arg("count"), py::arg("T"), py::arg("n"),
          py::arg("dtype"), py::arg("acc"), py::arg("fp16_deltas"), py::arg("num_threads"),
          py::call_guard<py::gil_scoped_release>(),
          "gram of a range of n elements held in `count` pieces: starts (count + 1 uint64, each on a\n"
          "chunk edge) and rows (count x (T + 1) addresses: base, then history) at those addresses.");
    m.def("combine_pieces", &combine_pieces, py::arg("starts"), py::arg("rows"), py::arg("count"), py::arg("T"),
          py::arg("n"), py::arg("dtype"), py::arg("alphas"), py::arg("outs"), py::arg("fp16_deltas"),
          py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
          "combine of a range held in pieces (as gram_pieces, pieces anywhere) into contiguous outs.");
    m.def("gram_table", &gram_table, py::arg("table"), py::arg("count"), py::arg("T"), py::arg("fp16_deltas"),
          py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
          "gram of `count` tensors: rows of uint64 (n, dtype, acc, base, hist[T]) at address `table`;\n"
          "each acc gets the bits of its own gram call.");
    m.def("combine_table", &combine_table, py::arg("table"), py::arg("count"), py::arg("T"), py::arg("K"),
          py::arg("fp16_deltas"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
          "combine of `count` tensors: rows of uint64 (n, dtype, alphas, base, hist[T], outs[K]) at\n"
          "address `table`; alphas of a row: K x T float32, C order.");
    m.attr("EIGH_MAX_T") = py::int_(relex::kEighMaxT);
    m.def("eigh_small", &eigh_small, py::arg("a"), py::arg("count"), py::arg("n"), py::arg("w"), py::arg("v"),
          py::arg("ok"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
          "All eigenpairs of `count` symmetric n x n float64 matrices at address a (n <= EIGH_MAX_T):\n"
          "w (count x n, ascending), v (count x n x n, columns the eigenvectors); ok[b] (uint8) = 0\n"
          "where matrix b is not finite or did not converge.");
    m.attr("FLOAT_TEXT") = py::bool_(relex::float_text_supported());
    m.def("float_rows_text", &float_rows_text, py::arg("addr"), py::arg("rows"), py::arg("cols"),
          "Each row of a rows x cols float64 array as its values' Python repr() joined by ', '\n"
          "(where FLOAT_TEXT: a build whose standard library has floating-point std::to_chars).");
    m.def("read_probe", &read_probe, py::arg("bufs"), py::arg("nbytes"), py::arg("num_threads"),
          py::call_guard<py::gil_scoped_release>(),
          "Read nbytes of every buffer (a checksum is returned): the read-bandwidth bound.");
    m.def("simd_level", [] { return std::string(relex::isa_name(relex::active_isa())); },
          "The SIMD path the kernels use now.");
    m.def("best_simd_level", [] { return std::string(relex::isa_name(relex::best_isa())); },
          "The best SIMD path this CPU supports.");
    m.def("set_simd_level", &relex::set_active_isa, py::arg("name"),
          "Use 'auto', 'scalar', 'avx2' or 'avx512' (at most the best supported); False if refused.");
    m.def("cpu_features", &relex::cpu_feature_list, "The CPU/OS features the dispatcher looked at.");
    m.def("max_threads", &max_threads, "OpenMP's default thread count (OMP_NUM_THREADS, affinity).");
    m.def("build_info", &build_info, "Compiler, OpenMP version and SIMD paths of this build.");
}
