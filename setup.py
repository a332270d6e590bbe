"""Builds fastperc._C: C++/OpenMP CPU kernels always; CUDA kernels when a CUDA torch and nvcc are
present (FASTPERC_CUDA=1 forces the CUDA build, FASTPERC_CUDA=0 disables it). Without torch at build
time, or without a compiler, the package installs pure Python and warns at import."""
import glob
import os
import re
import subprocess
import sys
import warnings

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def cuda_archs(cuda_home: str) -> list[str]:
    """Compute capabilities to build SASS for: 80 and 90 always, 100 and 120 when nvcc is 12.8+;
    FASTPERC_CUDA_ARCHS="90;100" overrides."""
    env = os.environ.get("FASTPERC_CUDA_ARCHS")
    if env:
        return [a.strip() for a in env.split(";") if a.strip()]
    archs = ["80", "90"]
    try:
        out = subprocess.check_output([os.path.join(cuda_home, "bin", "nvcc"), "--version"], text=True)
        major, minor = map(int, re.search(r"release (\d+)\.(\d+)", out).groups())
        if (major, minor) >= (12, 8):
            archs += ["100", "120"]
    except (OSError, subprocess.CalledProcessError, AttributeError):
        pass
    return archs


def nvcc_flags(cuda_home: str) -> list[str]:
    """The nvcc arguments of the real build (tests/test_build_checks.py compiles with these too): SASS
    for every listed architecture, and PTX for the newest so that newer GPUs can JIT it."""
    archs = cuda_archs(cuda_home)
    newest = max(archs, key=int)
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    gencode.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return ["-O3", *gencode]


def cuda_arch_defines(cuda_home: str) -> list[str]:
    """What the binary holds, for fastperc._C.cuda_archs(): `auto` checks the GPU against it. Given to
    the C++ compiler only (nvcc would split the comma list into separate macros)."""
    archs = cuda_archs(cuda_home)
    return [f"-DFASTPERC_SASS_ARCHS={','.join(archs)}", f"-DFASTPERC_PTX_ARCH={max(archs, key=int)}"]


def max_jobs() -> None:
    """Parallel compile jobs from cores and RAM (nvcc needs ~4 GiB a job) unless MAX_JOBS is set."""
    if "MAX_JOBS" in os.environ:
        return
    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = 8
    os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(mem_gib // 4))))


def extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        warnings.warn("fastperc: torch is not importable at build time; installing without fastperc._C")
        return [], {}
    max_jobs()
    flag = os.environ.get("FASTPERC_CUDA")
    want_cuda = flag == "1" or (flag != "0" and torch.version.cuda is not None and CUDA_HOME is not None)
    sources = ["csrc/fastperc.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-fopenmp"]
    link = ["-fopenmp"]
    if want_cuda:
        if CUDA_HOME is None:
            sys.exit("FASTPERC_CUDA=1 but no CUDA toolkit (nvcc) was found; set CUDA_HOME")
        ext = CUDAExtension(
            "fastperc._C", sources + sorted(glob.glob("csrc/cuda/*.cu")),
            define_macros=[("FASTPERC_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx + cuda_arch_defines(CUDA_HOME), "nvcc": nvcc_flags(CUDA_HOME)},
            extra_link_args=link)
    else:
        if torch.version.cuda is not None and flag != "0":
            warnings.warn("fastperc: CUDA torch but no nvcc found; building the CPU kernels only")
        ext = CppExtension("fastperc._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=True)}


if __name__ == "__main__":  # pip and `python setup.py` run it as __main__; tests import the helpers above
    ext_modules, cmdclass = extensions()
    setup(ext_modules=ext_modules, cmdclass=cmdclass)
