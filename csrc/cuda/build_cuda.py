"""Build ``relex_kernels._C_cuda`` with nvcc: used by setup.py, tests/test_cuda_build.py and
benchmarks/gpu_check.sh (``python csrc/cuda/build_cuda.py --inplace``).

No torch and no torch.utils.cpp_extension: the module is plain pybind11 over the CUDA
runtime (linked statically), so it builds without a CUDA build of torch and keeps
working across torch upgrades.

When setup.py builds it (see :func:`want_cuda`):

* ``RELEX_SKIP_CUDA=1``  never;
* ``RELEX_FORCE_CUDA=1`` always, and a failure is an error;
* otherwise only when nvcc is found *and* an NVIDIA GPU is visible — CPU machines that
  merely have a CUDA toolkit (CI) do not spend a minute compiling kernels they cannot
  run; a failure then warns and the CPU build goes on.

Architectures: ``TORCH_CUDA_ARCH_LIST`` ("8.0;9.0", "8.0 9.0+PTX", "80,90", "sm_90"),
default sm_80 and sm_90.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import time
from concurrent.futures import ThreadPoolExecutor

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
CUDA_SOURCES = ("kernels.cu", "ops.cu")
BINDING = "bindings.cpp"
DEFAULT_ARCHS = "8.0;9.0"
MODULE = "_C_cuda"


def find_nvcc() -> str | None:
    for var in ("CUDA_HOME", "CUDA_PATH"):
        root = os.environ.get(var)
        if root and os.access(os.path.join(root, "bin", "nvcc"), os.X_OK):
            return os.path.join(root, "bin", "nvcc")
    found = shutil.which("nvcc")
    if found:
        return found
    default = "/usr/local/cuda/bin/nvcc"
    return default if os.access(default, os.X_OK) else None


def nvcc_version(nvcc: str) -> tuple[int, int]:
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout
    m = re.search(r"release (\d+)\.(\d+)", out)
    if not m:
        raise RuntimeError(f"cannot read the version of {nvcc}: {out.strip()[-200:]}")
    return int(m.group(1)), int(m.group(2))


def parse_archs(text: str | None = None) -> list[tuple[str, bool]]:
    """[(cc like '90', with_ptx)] from TORCH_CUDA_ARCH_LIST-style text."""
    text = text if text is not None else (os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS)
    archs = []
    for tok in re.split(r"[;,\s]+", text.strip()):
        if not tok:
            continue
        ptx = tok.upper().endswith("+PTX")
        tok = tok[:-4] if ptx else tok
        tok = tok.lower().removeprefix("sm_").removeprefix("compute_")
        m = re.fullmatch(r"(\d+)\.?(\d)?([af]?)", tok)
        if not m:
            raise ValueError(f"cannot read CUDA architecture {tok!r} (TORCH_CUDA_ARCH_LIST={text!r})")
        cc = m.group(1) + (m.group(2) or ("0" if len(m.group(1)) == 1 else "")) + m.group(3)
        if cc not in [a for a, _ in archs]:
            archs.append((cc, ptx))
    if not archs:
        raise ValueError(f"no CUDA architecture in {text!r}")
    return archs


def arch_flags(archs) -> list[str]:
    flags = []
    for cc, ptx in archs:
        codes = f"sm_{cc}" + (f",compute_{cc}" if ptx else "")
        flags += ["-gencode", f"arch=compute_{cc},code=[{codes}]"]
    return flags


def arch_label(archs) -> str:
    return ";".join(f"sm_{cc}" + (f";compute_{cc}" if ptx else "") for cc, ptx in archs)


def common_flags(version: tuple[int, int]) -> list[str]:
    flags = ["-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Xcompiler", "-fvisibility=hidden", "--threads", "0"]
    if version >= (12, 8):
        # kernels.cu instantiates the templates ops.cu launches (bitsandbytes' layout);
        # since CUDA 12.8 template stubs are static per file unless told otherwise
        flags.append("-static-global-template-stub=false")
    return flags


def compile_cmd(nvcc: str, src: str, obj: str, archs, version, includes=()) -> list[str]:
    cmd = [nvcc, "-c", src, "-o", obj] + common_flags(version)
    if src.endswith(".cu"):
        cmd += arch_flags(archs)
    else:
        cmd += ["-x", "c++", f'-DRELEX_CUDA_ARCHS="{arch_label(archs)}"']
    for inc in includes:
        cmd += ["-I", inc]
    return cmd


def _run(cmd: list[str]) -> tuple[float, str]:
    """(seconds, compiler messages) of a successful command; raises with the messages otherwise."""
    t0 = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"nvcc failed ({' '.join(cmd)}):\n{r.stdout[-4000:]}{r.stderr[-4000:]}")
    return time.perf_counter() - t0, (r.stdout + r.stderr).strip()


def compile_objects(build_dir: str, archs=None, nvcc: str | None = None, sources=CUDA_SOURCES,
                    with_binding: bool = True) -> dict[str, tuple[float, str]]:
    """Compile the sources to objects in ``build_dir`` (in parallel): {source: (seconds, messages)}."""
    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise RuntimeError("nvcc not found (set CUDA_HOME or put nvcc on PATH)")
    archs = parse_archs() if archs is None else archs
    version = nvcc_version(nvcc)
    os.makedirs(build_dir, exist_ok=True)
    jobs = [(s, compile_cmd(nvcc, os.path.join(HERE, s), os.path.join(build_dir, s + ".o"), archs, version))
            for s in sources]
    if with_binding:
        import pybind11
        inc = [sysconfig.get_paths()["include"], pybind11.get_include()]
        jobs.append((BINDING, compile_cmd(nvcc, os.path.join(HERE, BINDING),
                                          os.path.join(build_dir, BINDING + ".o"), archs, version, inc)))
    with ThreadPoolExecutor(len(jobs)) as ex:
        results = list(ex.map(lambda j: _run(j[1]), jobs))
    return {name: r for (name, _), r in zip(jobs, results)}


def link(build_dir: str, out_path: str, nvcc: str | None = None, archs=None) -> str:
    nvcc = nvcc or find_nvcc()
    archs = parse_archs() if archs is None else archs
    objs = [os.path.join(build_dir, s + ".o") for s in CUDA_SOURCES + (BINDING,)]
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp = out_path + ".tmp"
    _run([nvcc, "-shared", "-o", tmp, *objs, "-cudart", "static", *arch_flags(archs)])
    os.replace(tmp, out_path)
    return out_path


def module_filename() -> str:
    return MODULE + sysconfig.get_config_var("EXT_SUFFIX")


def build(out_dir: str, build_dir: str | None = None, archs=None, nvcc: str | None = None) -> str:
    """Compile and link ``out_dir/_C_cuda<EXT_SUFFIX>``; returns its path (raises on failure)."""
    build_dir = build_dir or os.path.join(ROOT, "build", "cuda")
    archs = parse_archs() if archs is None else archs
    compile_objects(build_dir, archs, nvcc)
    return link(build_dir, os.path.join(out_dir, module_filename()), nvcc, archs)


def gpu_visible() -> bool:
    if os.path.isdir("/proc/driver/nvidia/gpus") and os.listdir("/proc/driver/nvidia/gpus"):
        return True
    return os.path.exists("/dev/nvidia0")


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no")


def want_cuda() -> tuple[bool, bool, str]:
    """(build it, failure is fatal, why) from the environment (module docstring)."""
    if _flag("RELEX_SKIP_CUDA"):
        return False, False, "RELEX_SKIP_CUDA is set"
    forced = _flag("RELEX_FORCE_CUDA")
    if find_nvcc() is None:
        return forced, forced, "nvcc not found"
    if forced:
        return True, True, "RELEX_FORCE_CUDA is set"
    if not gpu_visible():
        return False, False, "nvcc found but no NVIDIA GPU here (RELEX_FORCE_CUDA=1 builds it anyway)"
    return True, False, "nvcc and an NVIDIA GPU found"


def build_ext_class(base):
    """setup.py's build_ext plus the CUDA module, built per :func:`want_cuda`."""

    class BuildExtWithCuda(base):
        def run(self):
            super().run()
            wanted, fatal, why = want_cuda()
            if not wanted:
                print(f"relex_kernels: not building the CUDA kernels: {why}", file=sys.stderr)
                return
            out_dir = os.path.join(ROOT if self.inplace else self.build_lib, "relex_kernels")
            try:
                path = build(out_dir, os.path.join(self.build_temp, "cuda"))
                print(f"relex_kernels: built {path} ({arch_label(parse_archs())})", file=sys.stderr)
            except Exception as e:
                if fatal:
                    raise
                print(f"WARNING relex_kernels: CUDA kernels not built ({e}); the CPU backends are unaffected",
                      file=sys.stderr)

    return BuildExtWithCuda


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inplace", action="store_true", help="write relex_kernels/_C_cuda*.so in the source tree")
    ap.add_argument("--out-dir", help="directory for the module (default: relex_kernels/ with --inplace)")
    ap.add_argument("--archs", help="architectures (default: $TORCH_CUDA_ARCH_LIST or 8.0;9.0)")
    args = ap.parse_args(argv)
    out_dir = args.out_dir or (os.path.join(ROOT, "relex_kernels") if args.inplace else None)
    if out_dir is None:
        ap.error("give --inplace or --out-dir")
    t0 = time.perf_counter()
    path = build(out_dir, archs=parse_archs(args.archs) if args.archs else None)
    print(f"built {path} in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
