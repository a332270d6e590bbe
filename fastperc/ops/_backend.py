"""Which backend runs an op: availability per device and the `backend="auto"` choice."""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from . import _ext
from ..errors import InputError

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
# Fastest first, per device type.
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


# Read once at import: torch.compile traces `resolve`, and must not trace file-system or env lookups.
# (Triton itself reads TRITON_INTERPRET when kernels are defined, so it must be set before import.)
_HAS_TRITON = importlib.util.find_spec("triton") is not None
TRITON_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def cuda_build_runs_on(capability: tuple[int, int], sass: list[int], ptx: int) -> bool:
    """Whether kernels built as SASS for compute capabilities `sass` (x10, e.g. 90) and PTX for `ptx`
    can run on a GPU of `capability`: SASS runs on the same major version at an equal or higher minor;
    PTX is JIT-compiled for any GPU at or above its version. An unknown build (no list) is trusted."""
    if not sass and not ptx:
        return True
    major, minor = capability
    cc = 10 * major + minor
    return any(s // 10 == major and s % 10 <= minor for s in sass) or (ptx > 0 and cc >= ptx)


@torch.compiler.assume_constant_result  # a property of the machine: torch.compile treats it as a constant
def _cuda_arch_problem(index: int) -> str:
    """'' when the built CUDA kernels run on GPU `index`, else why not (checked once per device)."""
    if index not in _arch_checked:
        archs = _ext.ext.cuda_archs()
        cap = torch.cuda.get_device_capability(index)
        ok = cuda_build_runs_on(cap, list(archs["sass"]), int(archs["ptx"]))
        _arch_checked[index] = "" if ok else (
            f"fastperc._C holds CUDA kernels for compute capabilities {list(archs['sass'])} (PTX {archs['ptx']}), "
            f"none of which runs on {torch.cuda.get_device_name(index)} (capability {cap[0]}.{cap[1]}); rebuild "
            f"with FASTPERC_CUDA_ARCHS=\"{cap[0]}{cap[1]}\"")
    return _arch_checked[index]


_arch_checked: dict[int, str] = {}


def why_unavailable(backend: str, device_type: str, device_index: int | None = None) -> str | None:
    """None if `backend` can run on tensors of `device_type` (and, for cuda, on GPU `device_index`,
    default the current one), else the reason."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"the 'cpu' backend runs on CPU tensors, got {device_type} tensors"
        return None if _ext.has("feature_mse_cpu") else f"fastperc._C was not built ({_ext.load_error})"
    if backend == "cuda":
        if device_type != "cuda":
            return f"the 'cuda' backend runs on CUDA tensors, got {device_type} tensors"
        if not _ext.has("feature_mse_cuda"):
            return "fastperc._C was built without CUDA kernels"
        if _ext.has("cuda_archs") and torch.cuda.is_available():
            problem = _cuda_arch_problem(torch.cuda.current_device() if device_index is None else device_index)
            return problem or None
        return None
    if backend == "triton":
        if not _HAS_TRITON:
            return "triton is not installed"
        if device_type == "cuda" or (device_type == "cpu" and TRITON_INTERPRETING):
            return None
        return f"triton runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got {device_type} tensors"
    return f"unknown backend {backend!r}"


_warned: set[str] = set()


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend for `backend` on `device`; auto falls back with one warning per device type."""
    if backend not in BACKENDS:
        raise InputError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    dt, idx = device.type, device.index
    if backend != "auto":
        reason = why_unavailable(backend, dt, idx)
        if reason is not None:
            raise RuntimeError(f"backend: {backend!r} is not available here: {reason}")
        return backend
    order = AUTO_ORDER.get(dt, ("reference",))
    for name in order:
        if why_unavailable(name, dt, idx) is None:
            if name != order[0] and dt not in _warned and not torch.compiler.is_compiling():
                _warned.add(dt)
                warnings.warn(f"fastperc: backend 'auto' on {dt} tensors uses {name!r}: {order[0]!r} is unavailable "
                              f"({why_unavailable(order[0], dt, idx)})", RuntimeWarning, stacklevel=3)
            return name
    return "reference"


def auto_choice(device_type: str) -> str:
    """What `auto` picks for a device type, without warning (for `python -m fastperc.info`)."""
    for name in AUTO_ORDER.get(device_type, ("reference",)):
        if why_unavailable(name, device_type) is None:
            return name
    return "reference"
