"""Loads the compiled extension fastperc._C once; the package works without it (reference path)."""
from __future__ import annotations

import importlib

try:
    ext = importlib.import_module("fastperc._C")  # plain pybind11 functions; the custom ops live in ops/*.py
    load_error: str | None = None
except ImportError as e:  # not built: pure-Python install or a build without a compiler
    ext = None
    load_error = str(e)

def has(op: str) -> bool:
    """True when the extension was built with the named function (e.g. 'feature_mse_cuda')."""
    return ext is not None and hasattr(ext, op)
