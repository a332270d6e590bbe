"""Argument checks shared by the public API.

Every check raises ValueError/TypeError naming the argument, what was expected and what came.
Checks of metadata (type, shape, dtype, device) are free and always run. Checks of values (ranges,
NaN) read data: on a GPU each one is a host sync that stalls the launch queue, so the hot path uses
the device-side form (`check_timesteps(..., host=False)`: torch._assert_async, no sync) and the host
form only where a caller asks for it. Value checks are skipped while torch.compile traces.
"""
from __future__ import annotations

import math

import torch
from .errors import InputError

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def tracing() -> bool:
    """True while torch.compile / torch.export trace: data-dependent checks are skipped then."""
    return torch.compiler.is_compiling()


def check_tensor(name: str, x, *, ndim_min: int = 1, floating: bool = True) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if floating and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating dtype (float16/bfloat16/float32/float64), got {x.dtype}")
    if x.dim() < ndim_min:
        raise InputError(f"{name}: expected at least {ndim_min} dimension(s), got shape {tuple(x.shape)}")


def check_like(name: str, x: torch.Tensor, ref_name: str, ref: torch.Tensor, dtype: bool = True) -> None:
    """x must match ref in shape, device and (unless dtype=False) dtype."""
    if x.shape != ref.shape:
        raise InputError(f"{name}: expected shape {tuple(ref.shape)} (the shape of {ref_name}), got {tuple(x.shape)}")
    if x.device != ref.device:
        raise InputError(f"{name}: expected device {ref.device} (the device of {ref_name}), got {x.device}")
    if dtype and x.dtype != ref.dtype:
        raise TypeError(f"{name}: expected dtype {ref.dtype} (the dtype of {ref_name}), got {x.dtype}")


def check_finite(name: str, x: torch.Tensor) -> None:
    if tracing():
        return
    if not bool(torch.isfinite(x).all()):
        bad = int((~torch.isfinite(x)).sum())
        raise InputError(f"{name}: expected finite values, got {bad} NaN/Inf element(s)")


def check_timesteps(name: str, t, batch: int, num_train_timesteps: int, device: torch.device,
                    host: bool = True) -> None:
    """Integer timesteps of shape (batch,) in [0, num_train_timesteps).

    host=True reads the range on the host (a ValueError with min and max; a sync on GPUs); host=False
    queues a device-side assert instead (no sync: a RuntimeError on CPU, a device-side assert on GPUs,
    either with this message)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected an integer torch.Tensor of shape ({batch},), got {type(t).__name__}")
    if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer dtype (e.g. torch.long), got {t.dtype}")
    if _one_per_sample(name, t, batch, device):
        return
    if not host:
        torch._assert_async(((t >= 0) & (t < num_train_timesteps)).all(),
                            f"{name}: expected values in [0, {num_train_timesteps - 1}]")
        return
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= num_train_timesteps:
        raise InputError(f"{name}: expected values in [0, {num_train_timesteps - 1}], got min {lo}, max {hi}")


def _one_per_sample(name: str, t: torch.Tensor, batch: int, device: torch.device) -> bool:
    """Shape (batch,) on `device`, else a ValueError; True when the values are not to be read (under
    tracing, or for an empty batch)."""
    if t.shape != (batch,):
        raise InputError(f"{name}: expected shape ({batch},) (one timestep per sample), got {tuple(t.shape)}")
    if t.device != device:
        raise InputError(f"{name}: expected device {device}, got {t.device}")
    return tracing() or batch == 0


def check_float_timesteps(name: str, t, batch: int, num_train_timesteps: int, device: torch.device,
                          host: bool = True) -> None:
    """Float timesteps of shape (batch,) in [0, num_train_timesteps]: a flow-matching schedule's
    timesteps sigma * T, as diffusers' `scheduler.timesteps[indices]` gives them.

    Integer tensors are refused: on a flow table an integer is most likely an index into
    `scheduler.timesteps` (index 0 is the noisiest entry), not a timestep. host=True/False as in
    check_timesteps (a NaN fails the range check either way)."""
    T = num_train_timesteps
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name}: expected a floating torch.Tensor of shape ({batch},) (the scheduler's timesteps, "
                        f"sigma * {T}), got {type(t).__name__}")
    if not t.dtype.is_floating_point:
        raise TypeError(f"{name}: expected float timesteps sigma * {T} for a flow-matching schedule (as "
                        f"`scheduler.timesteps[indices]` gives them), got {t.dtype}; integer indices into the table "
                        "are not timesteps here: pass schedule.timesteps[indices]")
    if _one_per_sample(name, t, batch, device):
        return
    if not host:
        torch._assert_async(((t >= 0) & (t <= T)).all(), f"{name}: expected values in [0, {T}] (sigma * {T})")
        return
    lo, hi = float(t.min()), float(t.max())
    if not (lo >= 0 and hi <= T):  # also false for NaN
        raise InputError(f"{name}: expected values in [0, {T}] (sigma * {T}), got min {lo:g}, max {hi:g}")


def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise InputError(f"{name}: expected one of {sorted(choices)}, got {value!r}")


def check_weights(name: str, weights, count: int) -> list[float]:
    """One finite weight >= 0 per layer, as floats: the loss and feature_mse refuse the same values (a
    negative weight would reward moving the features apart)."""
    if isinstance(weights, torch.Tensor):
        weights = weights.tolist()
    w = [float(x) for x in weights]
    if len(w) != count:
        raise InputError(f"{name}: expected {count} values (one per layer), got {len(w)}")
    if not all(math.isfinite(x) and x >= 0 for x in w):
        raise InputError(f"{name}: expected finite values >= 0 (one per layer), got {w}")
    return w
