"""Loads the compiled extension fastperc._C once; the package works without it (reference path)."""
from __future__ import annotations

import importlib
import warnings

try:
    ext = importlib.import_module("fastperc._C")  # also registers the fastperc:: native ops
    load_error: str | None = None
except ImportError as e:  # not built: pure-Python install or a build without a compiler
    ext = None
    load_error = str(e)

_warned = False


def warn_missing_once() -> None:
    """One warning per process when the extension is absent and a native backend was wanted."""
    global _warned
    if ext is None and not _warned:
        _warned = True
        warnings.warn(f"fastperc: the compiled extension fastperc._C is not available ({load_error}); "
                      "using the pure-PyTorch reference path. Build it with `pip install -e . --no-build-isolation`.",
                      RuntimeWarning, stacklevel=3)


def has(op: str) -> bool:
    """True when the extension was built with the named function (e.g. 'feature_mse_cuda')."""
    return ext is not None and hasattr(ext, op)
