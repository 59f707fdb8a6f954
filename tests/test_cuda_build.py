"""csrc/cuda compiles with nvcc for sm_80 and sm_90, links into relex_kernels._C_cuda and imports.

Runs wherever nvcc is found (CI has one but no GPU): the kernels cannot run here, but
a compile error, a missing template instantiation or a binding that does not load
fails this test. The compile is the slow part (about 25 s of CPU time for both
architectures, in parallel); it happens once per session in a temporary directory.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "csrc", "cuda"))

import build_cuda  # noqa: E402

ARCHS = build_cuda.parse_archs("8.0;9.0")


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    nvcc = build_cuda.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    pytest.importorskip("pybind11")
    d = tmp_path_factory.mktemp("cuda_build")
    t0 = time.perf_counter()
    results = build_cuda.compile_objects(str(d / "obj"), ARCHS, nvcc)
    path = build_cuda.link(str(d / "obj"), str(d / "mod" / build_cuda.module_filename()), nvcc, ARCHS)
    wall = time.perf_counter() - t0
    print(f"\nCUDA build for {build_cuda.arch_label(ARCHS)} with {nvcc} {build_cuda.nvcc_version(nvcc)}: "
          f"{wall:.1f} s wall; " + ", ".join(f"{k} {t:.1f} s" for k, (t, _) in results.items()))
    return results, path


def test_sources_compile_for_sm80_and_sm90_without_warnings(built):
    results, _ = built
    assert set(results) == {"kernels.cu", "ops.cu", "bindings.cpp"}
    for name, (_, messages) in results.items():
        assert "warning" not in messages.lower(), f"{name}:\n{messages}"


def test_module_loads_and_explains_missing_gpu(built):
    _, path = built
    spec = importlib.util.spec_from_file_location("_C_cuda", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.archs == "sm_80;sm_90"
    assert mod.GRAM_CHUNK == 1 << 16
    assert mod.gram_partials_numel(3, 1) == 8 * 9
    assert mod.resolve_precision(8, -1) == 0 and mod.resolve_precision(64, -1) == 1
    count, why = mod.device_count()
    if count == 0:  # the usual CI case: the reason must be readable
        assert why
        with pytest.raises(RuntimeError, match="relex gram kernel launch"):
            mod.gram(1, 10, 10, 3, 2, False, 1, 1, -1, 0)
    with pytest.raises(RuntimeError):  # bad arguments are refused before any launch
        mod.combine(0, 10, 10, 3, 9, False, 0, 1, 0, 10, 0)


def test_arch_list_parsing():
    assert build_cuda.parse_archs("8.0;9.0") == [("80", False), ("90", False)]
    assert build_cuda.parse_archs("8.6 9.0+PTX") == [("86", False), ("90", True)]
    assert build_cuda.parse_archs("sm_80,sm_90a") == [("80", False), ("90a", False)]
    assert build_cuda.arch_label(build_cuda.parse_archs("9.0+PTX")) == "sm_90;compute_90"
    assert build_cuda.arch_flags([("90", True)]) == ["-gencode", "arch=compute_90,code=[sm_90,compute_90]"]
    with pytest.raises(ValueError):
        build_cuda.parse_archs("volta")


def test_build_policy(monkeypatch):
    monkeypatch.setenv("RELEX_SKIP_CUDA", "1")
    monkeypatch.setenv("RELEX_FORCE_CUDA", "1")
    assert build_cuda.want_cuda()[0] is False  # skip wins
    monkeypatch.delenv("RELEX_SKIP_CUDA")
    assert build_cuda.want_cuda()[:2] == (True, True)  # forced: failures are fatal
    monkeypatch.delenv("RELEX_FORCE_CUDA")
    monkeypatch.setattr(build_cuda, "gpu_visible", lambda: False)
    monkeypatch.setattr(build_cuda, "find_nvcc", lambda: "/usr/bin/nvcc")
    build, fatal, why = build_cuda.want_cuda()
    assert not build and "no NVIDIA GPU" in why  # CI: nvcc but no GPU -> no minutes spent compiling
    monkeypatch.setattr(build_cuda, "gpu_visible", lambda: True)
    assert build_cuda.want_cuda()[:2] == (True, False)  # warn and go on if it fails
    monkeypatch.setattr(build_cuda, "find_nvcc", lambda: None)
    assert build_cuda.want_cuda()[0] is False
