"""Build of relex_kernels: the Python package plus the optional native extension(s).

* ``relex_kernels._C`` (CPU, pybind11 + OpenMP) is always built. It is compiled for
  baseline x86-64 / aarch64; the AVX2 and AVX-512 kernels carry their own target
  attributes and are chosen at run time, so one build runs on any CPU of the
  architecture. No torch headers: the module passes raw addresses, so one build
  works across torch versions.
* ``relex_kernels._C_cuda``: optional, built by csrc/cuda/build_cuda.py (see
  :func:`with_cuda`): ``RELEX_SKIP_CUDA=1`` never builds it, ``RELEX_FORCE_CUDA=1``
  makes a failure an error, architectures come from ``TORCH_CUDA_ARCH_LIST``.

pybind11 is needed at build time only: pyproject.toml lists it as a build requirement
(pip's isolated PEP 517 build installs it) and it is imported lazily.
"""

import glob
import importlib.util
import os

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = os.path.dirname(os.path.abspath(__file__))


class _PybindInclude:
    """Resolved when the compiler runs, after setup_requires made pybind11 importable."""

    def __str__(self) -> str:
        import pybind11

        return pybind11.get_include()


# -ffp-contract=off: combine must round every product and sum separately (its results
# are bit-identical to the reference); GCC would otherwise fuse mul+add intrinsics.
# No -march=native and no -ffast-math (denormals and NaN must behave as in numpy).
_CPU_COMPILE_ARGS = ["-O3", "-g0", "-std=c++17", "-fopenmp", "-ffp-contract=off", "-fvisibility=hidden", "-Wall"]
_CPU_LINK_ARGS = ["-fopenmp"]


def cpu_extension() -> Extension:
    sources = sorted(glob.glob(os.path.join("csrc", "cpu", "*.cpp"))) + [os.path.join("python", "bindings.cpp")]
    return Extension(
        "relex_kernels._C",
        sources=sources,
        include_dirs=[_PybindInclude(), os.path.join("csrc", "cpu")],
        depends=sorted(glob.glob(os.path.join("csrc", "cpu", "*.h"))),
        language="c++",
        # RELEX_PORTABLE_ONLY=1: only the portable kernels, as on aarch64 (to test that path)
        define_macros=[("RELEX_PORTABLE_ONLY", "1")] if os.environ.get("RELEX_PORTABLE_ONLY") else [],
        extra_compile_args=list(_CPU_COMPILE_ARGS),
        extra_link_args=list(_CPU_LINK_ARGS),
    )


def with_cuda(build_ext_base):
    """The place of the optional CUDA module ``relex_kernels._C_cuda``: csrc/cuda/build_cuda.py.

    That helper owns the CUDA policy (``RELEX_SKIP_CUDA`` / ``RELEX_FORCE_CUDA``, nvcc
    detection, ``TORCH_CUDA_ARCH_LIST``) and extends build_ext to run nvcc after the CPU
    extension is built. Without it (a CPU-only source tree) build_ext is unchanged.
    """
    helper = os.path.join(HERE, "csrc", "cuda", "build_cuda.py")
    if not os.path.exists(helper):
        return build_ext_base
    spec = importlib.util.spec_from_file_location("relex_build_cuda", helper)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.build_ext_class(build_ext_base)


class BuildExt(build_ext):
    """Adapts the OpenMP/C++ flags to the compiler (MSVC has its own spellings)."""

    def build_extensions(self):
        if self.compiler.compiler_type == "msvc":
            for ext in self.extensions:
                ext.extra_compile_args = ["/O2", "/std:c++17", "/openmp", "/fp:precise"]
                ext.extra_link_args = []
        super().build_extensions()


setup(
    name="relex_kernels",
    version="0.1.0",
    description="Streaming RELEX extrapolation of RLVR checkpoints with fused CPU/GPU kernels",
    packages=find_packages(include=["relex_kernels", "relex_kernels.*"]),
    package_data={"relex_kernels": ["py.typed"]},
    python_requires=">=3.10",
    install_requires=["numpy>=1.24", "tqdm>=4.60"],
    extras_require={
        # triton: its kernels run under TRITON_INTERPRET=1 in the CPU tests; trl: the miniature of
        # benchmarks/real_rl (GRPO with TRL, tests/test_real_rl.py)
        "test": ["pytest>=7", "pytest-benchmark", "hypothesis", "safetensors", "torch", "transformers", "accelerate",
                 "triton", "matplotlib", "trl"],
    },
    ext_modules=[cpu_extension()],
    cmdclass={"build_ext": with_cuda(BuildExt)},
    entry_points={"console_scripts": ["relex=relex_kernels.cli:main"]},
)
