"""Deprecated: the truncated forwards moved to `fastperc.adapters` (one file per family, with probes and
a registry). This module forwards the old names for one release."""
from __future__ import annotations

import warnings

from . import adapters as _adapters
from .adapters import dit as _dit, flux as _flux, sd3 as _sd3, unets as _unets

_MOVED = {"Adapter": _adapters.Adapter, "find_adapter": _adapters.find_adapter,
          "DiffusersUNet2DAdapter": _unets.DiffusersUNet2DAdapter,
          "DiffusersUNet2DConditionAdapter": _unets.DiffusersUNet2DConditionAdapter,
          "DiTAdapter": _dit.DiTAdapter, "PixArtAdapter": _dit.PixArtAdapter, "SD3Adapter": _sd3.SD3Adapter,
          "FluxAdapter": _flux.FluxAdapter}


def __getattr__(name: str):
    if name in _MOVED:
        warnings.warn(f"fastperc.truncated_forwards.{name} is deprecated; use fastperc.adapters "
                      "(removed in the next release)", DeprecationWarning, stacklevel=2)
        return _MOVED[name]
    raise AttributeError(f"module 'fastperc.truncated_forwards' has no attribute {name!r}")
