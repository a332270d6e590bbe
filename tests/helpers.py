"""Test helpers: tiny models and configs, a verbose closeness check, the training log and the CLI."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from fastperc.models import UNet


def tiny_unet(num_classes=None, dtype=torch.float32, **kw) -> UNet:
    """A 2-level UNet on 8x8 images: fast enough for gradcheck."""
    kw = {"block_channels": (8, 16), "norm_groups": 4, "num_classes": num_classes, **kw}
    return UNet(**kw).to(dtype)


# A training config small enough for many runs per test file (fastperc's UNet at two levels, 8 images a step).
TINY = dict(block_channels=(8, 16), batch_size=8, lr=1e-3, warmup_steps=1, log_every=1, progress=False,
            held_out=500)


def losses(run: Path) -> list[float]:
    """The logged training losses of a run folder, in step order (events left out)."""
    rows = [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "event" not in r]


def log_rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run) / "log.jsonl").read_text().splitlines()]


def cli(*args, timeout=300, env_extra=None) -> subprocess.CompletedProcess:
    """`python -m fastperc ARGS` in a fresh process, one thread (the end-to-end tests' way in)."""
    env = {**os.environ, **(env_extra or {}), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fastperc", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def assert_same_training_state(a: dict, b: dict) -> None:
    """Every tensor of the model, the EMA and the optimizer state, and the step, are equal."""
    assert a["step"] == b["step"]
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k}"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), f"optimizer.state[{i}].{k}"
    for k in a["counters"]:
        assert torch.equal(a["counters"][k], b["counters"][k]), f"counters.{k}"


def assert_close(actual: torch.Tensor, expected: torch.Tensor, rtol: float, atol: float, what: str = "") -> None:
    """allclose that never passes NaN and names the first mismatching indices."""
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(expected).all(), f"{what}: the expected values hold NaN/Inf (bad test data)"
    bad = ~torch.isclose(actual, expected, rtol=rtol, atol=atol, equal_nan=False)
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        vals = [(i, actual[tuple(i)].item(), expected[tuple(i)].item()) for i in idx]
        raise AssertionError(f"{what}: {int(bad.sum())}/{bad.numel()} elements differ (rtol={rtol}, atol={atol}); "
                             f"first (index, actual, expected): {vals}")


def features_by_hooks(model, layers, sample, timestep, **kwargs) -> list[torch.Tensor]:
    """Ground truth: the full forward of `model` with hooks on `layers` (no truncation)."""
    modules = dict(model.named_modules())
    got = {}

    def hook(name):
        def fn(module, args, out):  # returns None: the module's output is left as it is
            got.setdefault(name, out[0] if isinstance(out, tuple) else out)
        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in layers]
    try:
        with torch.no_grad():
            model(sample, timestep, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return [got[n] for n in layers]


def hand_loss(model, layers, weights, model_output, x0, noise, t, t2, schedule, kind):
    """The objective written out from DESIGN section 1, with the untruncated model."""
    ac = schedule.alphas_cumprod.to(x0.dtype)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    a, s = ac[t].sqrt().view(shape), (1 - ac[t]).sqrt().view(shape)
    a2, s2 = ac[t2].sqrt().view(shape), (1 - ac[t2]).sqrt().view(shape)
    x_t = a * x0 + s * noise
    if kind == "v_prediction":
        x0_hat, eps_hat = a * x_t - s * model_output, s * x_t + a * model_output
    elif kind == "epsilon":
        eps_hat, x0_hat = model_output, (x_t - s * model_output) / a
    else:
        x0_hat, eps_hat = model_output, (x_t - a * model_output) / s
    real = a2 * x0 + s2 * noise
    fake = a2 * x0_hat + s2 * eps_hat
    modules = dict(model.named_modules())
    feats = {}

    def hook(name):
        def fn(module, args, out):
            feats.setdefault(name, out[0] if isinstance(out, tuple) else out)
        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in layers]
    try:
        with torch.no_grad():
            model(real, t2)
        f_real = [feats.pop(n) for n in layers]
        model(fake, t2)
        f_fake = [feats.pop(n) for n in layers]
    finally:
        for h in handles:
            h.remove()
    return sum(w * F.mse_loss(f, r) for w, f, r in zip(weights, f_fake, f_real))


class HostSyncAlarm(TorchDispatchMode):
    """Records every op that would make a GPU wait for the host or the host for the GPU: reading a
    value (`.item()`, `bool(t)`, `int(t)`: _local_scalar_dense), data-dependent shapes (nonzero), and
    tensors built from host data (torch.tensor(list): lift_fresh; a host-to-device copy: _to_copy)."""
    FORBIDDEN = ("_local_scalar_dense", "item", "nonzero", "lift_fresh", "tolist", "is_nonzero")

    def __init__(self):
        super().__init__()
        self.hits: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        moves = ("_to_copy" in name or "copy_" in name) and _crosses_devices(func, args, kwargs)
        if moves or any(word in name for word in self.FORBIDDEN):
            self.hits.append(name)
        return func(*args, **kwargs)


def _crosses_devices(func, args, kwargs) -> bool:
    """A copy between devices (host <-> GPU); a dtype cast on one device is not a sync."""
    if "copy_" in str(func):
        return args[0].device != args[1].device
    target = kwargs.get("device")
    return target is not None and torch.device(target) != args[0].device
