"""Which backend runs an op: availability per device and the `backend="auto"` choice."""
from __future__ import annotations

import importlib.util
import os
import warnings

import torch

from . import _ext

BACKENDS = ("auto", "reference", "cpu", "triton", "cuda")
# Fastest first, per device type.
AUTO_ORDER = {"cuda": ("cuda", "triton", "reference"), "cpu": ("cpu", "reference")}


# Read once at import: torch.compile traces `resolve`, and must not trace file-system or env lookups.
# (Triton itself reads TRITON_INTERPRET when kernels are defined, so it must be set before import.)
_HAS_TRITON = importlib.util.find_spec("triton") is not None
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def triton_interpreting() -> bool:
    return _INTERPRET


def why_unavailable(backend: str, device_type: str) -> str | None:
    """None if `backend` can run on tensors of `device_type`, else the reason."""
    if backend == "reference":
        return None
    if backend == "cpu":
        if device_type != "cpu":
            return f"the 'cpu' backend runs on CPU tensors, got {device_type} tensors"
        return None if _ext.has("feature_mse_cpu") else f"fastperc._C was not built ({_ext.load_error})"
    if backend == "cuda":
        if device_type != "cuda":
            return f"the 'cuda' backend runs on CUDA tensors, got {device_type} tensors"
        return None if _ext.has("feature_mse_cuda") else "fastperc._C was built without CUDA kernels"
    if backend == "triton":
        if not _HAS_TRITON:
            return "triton is not installed"
        if device_type == "cuda" or (device_type == "cpu" and _INTERPRET):
            return None
        return f"triton runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1), got {device_type} tensors"
    return f"unknown backend {backend!r}"


_warned: set[str] = set()


def resolve(backend: str, device: torch.device) -> str:
    """The concrete backend for `backend` on `device`; auto falls back with one warning per device type."""
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {list(BACKENDS)}, got {backend!r}")
    dt = device.type
    if backend != "auto":
        reason = why_unavailable(backend, dt)
        if reason is not None:
            raise RuntimeError(f"backend: {backend!r} is not available here: {reason}")
        return backend
    order = AUTO_ORDER.get(dt, ("reference",))
    for name in order:
        if why_unavailable(name, dt) is None:
            if name != order[0] and dt not in _warned and not torch.compiler.is_compiling():
                _warned.add(dt)
                warnings.warn(f"fastperc: backend 'auto' on {dt} tensors uses {name!r}: {order[0]!r} is unavailable "
                              f"({why_unavailable(order[0], dt)})", RuntimeWarning, stacklevel=3)
            return name
    return "reference"


def auto_choice(device_type: str) -> str:
    """What `auto` picks for a device type, without warning (for `python -m fastperc.info`)."""
    for name in AUTO_ORDER.get(device_type, ("reference",)):
        if why_unavailable(name, device_type) is None:
            return name
    return "reference"
