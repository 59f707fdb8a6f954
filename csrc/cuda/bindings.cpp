// relex_kernels._C_cuda: the CUDA launchers for Python, free of torch's C++ ABI.
//
// Arguments are integers (device pointers from torch's data_ptr(), the stream from
// torch.cuda.Stream.cuda_stream), sizes and dtype codes, so one build works with any
// torch version. Errors come back as RuntimeError with the CUDA error string.
#include <pybind11/pybind11.h>

#include <stdexcept>
#include <string>

#include "ops.h"

namespace py = pybind11;

#ifndef RELEX_CUDA_ARCHS
#define RELEX_CUDA_ARCHS "unknown"
#endif

namespace {

void check(int err, const char* what) {
    if (err != 0) throw std::runtime_error(std::string(what) + ": " + relex_cuda::error_string(err));
}

}  // namespace

PYBIND11_MODULE(_C_cuda, m) {
    m.doc() = "CUDA kernels of relex_kernels (raw device pointers; see relex_kernels/ops/cuda.py)";
    m.attr("archs") = RELEX_CUDA_ARCHS;
    m.attr("GRAM_CHUNK") = 1 << 16;
    m.def("gram_partials_numel", &relex_cuda::gram_partials_numel, py::arg("T"), py::arg("n"));
    m.def("resolve_precision", &relex_cuda::resolve_precision, py::arg("T"), py::arg("precision"));
    m.def(
        "gram",
        [](uintptr_t x, int64_t stride, int64_t n, int T, int dtype, bool fp16, uintptr_t acc, uintptr_t part,
           int precision, uintptr_t stream) {
            int e;
            {
                py::gil_scoped_release nogil;
                e = relex_cuda::gram(x, stride, n, T, dtype, fp16, acc, part, precision, stream);
            }
            check(e, "relex gram kernel launch");
        },
        py::arg("x"), py::arg("stride"), py::arg("n"), py::arg("T"), py::arg("dtype"), py::arg("fp16_deltas"),
        py::arg("acc"), py::arg("part"), py::arg("precision"), py::arg("stream"));
    m.def(
        "combine",
        [](uintptr_t x, int64_t stride, int64_t n, int T, int dtype, bool fp16, uintptr_t alphas, int K,
           uintptr_t out, int64_t out_stride, uintptr_t stream) {
            int e;
            {
                py::gil_scoped_release nogil;
                e = relex_cuda::combine(x, stride, n, T, dtype, fp16, alphas, K, out, out_stride, stream);
            }
            check(e, "relex combine kernel launch");
        },
        py::arg("x"), py::arg("stride"), py::arg("n"), py::arg("T"), py::arg("dtype"), py::arg("fp16_deltas"),
        py::arg("alphas"), py::arg("K"), py::arg("out"), py::arg("out_stride"), py::arg("stream"));
    m.def(
        "power_iteration",
        [](uintptr_t G, uintptr_t v0, uintptr_t work, uintptr_t lam, uintptr_t U, uintptr_t status, int B, int T,
           int R, int max_iter, double tol, double max_rate, uintptr_t stream) {
            check(relex_cuda::power_iteration(G, v0, work, lam, U, status, B, T, R, max_iter, tol, max_rate, stream),
                  "relex power iteration launch");
        },
        py::arg("G"), py::arg("v0"), py::arg("work"), py::arg("lam"), py::arg("U"), py::arg("status"), py::arg("B"),
        py::arg("T"), py::arg("R"), py::arg("max_iter"), py::arg("tol"), py::arg("max_rate"), py::arg("stream"));
    m.def(
        "device_count",
        []() {
            int n = 0;
            int e = relex_cuda::device_count(&n);
            return py::make_tuple(n, e == 0 ? std::string() : std::string(relex_cuda::error_string(e)));
        },
        "(number of CUDA devices, '' or the CUDA error that explains 0)");
    m.def("device_name", [](int device) {
        std::string name;
        int major = 0, minor = 0;
        check(relex_cuda::device_name(device, &name, &major, &minor), "cudaGetDeviceProperties");
        return py::make_tuple(name, major, minor);
    });
    m.def("runtime_version", []() {
        int v = 0;
        check(relex_cuda::runtime_version(&v), "cudaRuntimeGetVersion");
        return v;
    });
    m.def("driver_version", []() {
        int v = 0;
        check(relex_cuda::driver_version(&v), "cudaDriverGetVersion");
        return v;
    });
}
