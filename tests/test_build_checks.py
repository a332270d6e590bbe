"""GPU code is proven to build on a machine without a GPU: every .cu file compiles with the real
build's nvcc flags (for Hopper in `make test`; every listed architecture plus PTX for the newest in
`make test-slow`), its vector paths store 16 bytes per instruction, the binding compiles with CUDA on
(`make test-slow`), and every Triton kernel compiles ahead of time for Hopper with 64-bit offsets and
16-byte stores."""
from __future__ import annotations

import collections
import inspect
import os
import re
import runpy
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from torch.utils import cpp_extension

ROOT = Path(__file__).resolve().parents[1]
CU_FILES = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
SETUP = runpy.run_path(str(ROOT / "setup.py"), run_name="fastperc_setup")  # the build's own flag helpers
NVCC = shutil.which("nvcc")
CUDA_HOME = str(Path(NVCC).resolve().parents[1]) if NVCC else None  # what setup.py asks nvcc --version of
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc is not on PATH: the CUDA compile checks need it")


def _cuobjdump() -> str | None:
    """cuobjdump from the CUDA toolkit, else the copy that ships inside the triton package."""
    found = shutil.which("cuobjdump")
    if found:
        return found
    try:
        import triton
    except ImportError:
        return None
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.exists() else None


def _torch_nvcc_flags() -> list[str]:
    """What torch's BuildExtension adds to every nvcc call on Linux (its C++ standard read from the
    installed torch's build rules, which moved from C++17 to C++20 across releases)."""
    std = "-std=c++20" if "'-std=c++20'" in inspect.getsource(cpp_extension) else "-std=c++17"
    return [*cpp_extension.COMMON_NVCC_FLAGS, "-Xcompiler", "-fPIC", std]


def _stub_dir(tmp_path: Path) -> Path:
    """The CPU torch wheel lacks this generated header; a two-line stub serves these checks only."""
    header = tmp_path / "stub" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    header.parent.mkdir(parents=True, exist_ok=True)
    header.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    return tmp_path / "stub"


def _includes(tmp_path: Path) -> list[str]:
    inc = [f"-I{_stub_dir(tmp_path)}"] + [f"-I{p}" for p in cpp_extension.include_paths()]
    return inc + [f"-I{sysconfig.get_paths()['include']}"]


def _compile_cu_files(tmp: Path, gencode: list[str] | None = None) -> dict[str, Path]:
    """Each .cu file compiled exactly as setup.py's CUDA build compiles it; `gencode` replaces the
    build's -gencode list (the fast suite compiles for Hopper only, the slow suite for every arch)."""
    flags = _torch_nvcc_flags() + SETUP["nvcc_flags"](CUDA_HOME) + ["-DFASTPERC_WITH_CUDA=1"]
    if gencode is not None:
        flags = [f for f in flags if not f.startswith("-gencode")] + gencode

    def compile_one(cu: Path):
        obj = tmp / (cu.stem + ".o")
        r = subprocess.run(["nvcc", "-c", str(cu), "-o", str(obj), *flags, *_includes(tmp)], capture_output=True,
                           text=True)
        return cu, obj, r

    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(compile_one, CU_FILES))
    for cu, _, r in results:
        assert r.returncode == 0, f"nvcc failed on {cu.name}:\n{r.stderr[-4000:]}"
    return {cu.stem: obj for cu, obj, _ in results}


@pytest.fixture(scope="module")
def hopper_objects(tmp_path_factory):
    """Each .cu file compiled with the build's flags, SASS for sm_90 only."""
    return _compile_cu_files(tmp_path_factory.mktemp("nvcc90"), ["-gencode=arch=compute_90,code=sm_90"])


@pytest.mark.slow  # nvcc on every .cu file takes half a minute on 2 cores: beyond the fast suite's budget
@needs_nvcc
def test_the_build_lists_ampere_and_hopper_and_every_cu_file_compiles_for_hopper(hopper_objects):
    assert CU_FILES, "no .cu files found"
    assert {"80", "90"} <= set(SETUP["cuda_archs"](CUDA_HOME))
    assert set(hopper_objects) == {cu.stem for cu in CU_FILES}


@needs_nvcc
@pytest.mark.slow
def test_every_cu_file_holds_sass_for_each_listed_arch_and_ptx_for_the_newest(tmp_path):
    objects = _compile_cu_files(tmp_path)
    archs = SETUP["cuda_archs"](CUDA_HOME)
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton package) to list the embedded code")
    newest = max(archs, key=int)
    for name, obj in objects.items():
        elf = subprocess.run([tool, "-lelf", str(obj)], capture_output=True, text=True).stdout
        ptx = subprocess.run([tool, "-lptx", str(obj)], capture_output=True, text=True).stdout
        for a in archs:
            assert f"sm_{a}" in elf, f"{name}.o: no SASS for sm_{a}:\n{elf}"
        assert f"sm_{newest}" in ptx, f"{name}.o: no PTX for compute_{newest} (newer GPUs could not JIT it):\n{ptx}"


def sass_memory_ops(tool: str, binary: Path, arch: str | None = None) -> dict[str, collections.Counter]:
    """Per kernel: counts of global loads/stores by width (LDG.E.128, STG.E, STG.E.U16, ...)."""
    cmd = [tool, "-sass", str(binary)] + (["-arch", f"sm_{arch}"] if arch else [])
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    ops: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    fn = None
    for line in out.splitlines():
        m = re.search(r"Function : (\S+)", line)
        if m:
            fn = m.group(1)
            continue
        m = re.search(r"\b(?:STG|LDG)\.E(?:\.[A-Z0-9]+)*", line)
        if m and fn:
            ops[fn][m.group(0).replace(".CONSTANT", "")] += 1
    return ops


def assert_vector_stores(ops: dict[str, collections.Counter], what: str) -> int:
    """Each vector iteration of these kernels loads two 16-byte vectors per 16-byte vector it stores
    (feature_mse: p, t -> g; renoise: x_t, p -> fake and x0, noise -> real), scale_rows one (g -> out)."""
    checked = 0
    for fn, c in ops.items():
        if c["LDG.E.128"]:
            checked += 1
            loads_per_store = 1 if "scale_rows" in fn or "scale_rows" in what else 2
            assert c["STG.E.128"] * loads_per_store == c["LDG.E.128"], \
                f"{what} {fn}: 16-byte loads without 16-byte stores: {dict(c)}"
    return checked


@pytest.mark.slow  # the same nvcc compile
@needs_nvcc
def test_cuda_vector_paths_store_16_bytes_per_instruction(hopper_objects):
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton package) to read the SASS")
    checked = sum(assert_vector_stores(sass_memory_ops(tool, obj, "90"), f"{name}.cu") for name, obj in
                  hopper_objects.items())
    assert checked >= 12  # renoise, feature_mse partials and scale_rows x 4 dtypes


@needs_nvcc
@pytest.mark.slow
def test_binding_compiles_with_cuda_kernels_declared(tmp_path):
    """fastperc.cpp with FASTPERC_WITH_CUDA and the build's arch defines (syntax only: no CUDA torch here)."""
    flags = ["-fsyntax-only", "-std=c++20" if "c++20" in _torch_nvcc_flags()[-1] else "-std=c++17",
             "-DFASTPERC_WITH_CUDA=1", "-DTORCH_EXTENSION_NAME=_C", *SETUP["cuda_arch_defines"](CUDA_HOME)]
    r = subprocess.run(["c++", *flags, *_includes(tmp_path), str(ROOT / "csrc" / "fastperc.cpp")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr[-4000:]


# ---- Triton, ahead of time ------------------------------------------------------------------------------
def _aot(code: str) -> str:
    """Run `code` in a fresh interpreter with TRITON_INTERPRET unset (the suite sets it)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    return r.stdout


@pytest.fixture(scope="module")
def triton_builds(tmp_path_factory):
    """Every Triton kernel x dtype x specialisation compiled for sm_90: TTIR and cubin files."""
    pytest.importorskip("triton")
    out = tmp_path_factory.mktemp("triton")
    listing = _aot(f"""
from pathlib import Path
from fastperc.ops._triton import aot
for dt in aot.DTYPES:
    for name, *_ in aot.specs(dt):
        for variant in aot.VARIANTS:
            k = aot.compile_kernel(name, dt, variant, 90)
            stem = Path({str(out)!r}) / f"{{name}}-{{dt}}-{{variant}}"
            stem.with_suffix(".ttir").write_text(k.asm["ttir"])
            stem.with_suffix(".cubin").write_bytes(k.asm["cubin"])
            print(stem.name, len(k.asm["ptx"]), len(k.asm["cubin"]))
""")
    return out, listing.split("\n")


def test_every_triton_kernel_compiles_for_hopper(triton_builds):
    _, lines = triton_builds
    lines = [ln for ln in lines if ln.strip()]
    assert len(lines) == 4 * 4 * 2, lines  # kernels x dtypes x specialisations
    for ln in lines:
        _, ptx, cubin = ln.split()
        assert int(ptx) > 1000 and int(cubin) > 1000, ln


def test_triton_kernels_index_memory_with_64_bit_offsets(triton_builds):
    """With 32-bit integer arguments (what the JIT passes below 2^31), every tensor of offsets added to
    a pointer is int64: a sample of 2^31 or more elements must not wrap to negative offsets."""
    out, _ = triton_builds
    files = sorted(out.glob("*.ttir"))
    assert len(files) == 32
    for f in files:
        adds = [ln.strip() for ln in f.read_text().splitlines() if "tt.addptr" in ln and "tensor<" in ln]
        assert adds, f"{f.name}: no vector pointer arithmetic found"
        narrow = [a for a in adds if re.search(r"tensor<\d+xi(8|16|32)>", a)]
        assert not narrow, f"{f.name}: 32-bit offsets: {narrow[:3]}"


def test_triton_aligned_kernels_store_16_bytes_per_instruction(triton_builds):
    tool = _cuobjdump()
    if tool is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton package) to read the SASS")
    out, _ = triton_builds
    checked = 0
    for f in sorted(out.glob("*-aligned.cubin")):
        if "finalize" in f.name:
            continue
        n = assert_vector_stores(sass_memory_ops(tool, f), f.name)
        assert n == 1, f"{f.name}: no 16-byte vector path"
        checked += n
    assert checked == 12


def test_extension_is_built_with_openmp_cpu_kernels():
    from fastperc.ops import _ext
    assert _ext.ext is not None, _ext.load_error
    info = _ext.ext.build_info()
    assert re.search(r"cpu\(openmp \d{6}, threads=\d+\)", info), info
