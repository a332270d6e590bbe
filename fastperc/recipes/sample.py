"""Deterministic sampling (DDIM with eta = 0 and "trailing" timestep spacing for variance-preserving
models, Euler steps for flow-matching models, as diffusers' FlowMatchEulerDiscreteScheduler), with
classifier-free guidance and guidance rescale (Lin et al. 2023), and the .npz + PNG-grid outputs of
`fastperc sample`."""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch

from . import latent
from .data import to_uint8
from .models import null_class, predict, schedule_of
from ..schedule import NoiseSchedule
from ..errors import InputError


@torch.no_grad()
def sample_loop(model, schedule: NoiseSchedule, noise: torch.Tensor, *, steps: int = 50,
                labels: torch.Tensor | None = None, null_label: int | None = None, cfg_scale: float = 1.0,
                guidance_rescale: float = 0.0, clip: bool = True) -> torch.Tensor:
    """Denoise `noise` (B, C, H, W) to images in [-1, 1] (`clip=False`: unclipped, for latents).

    The schedule says where to step (`sampling_timesteps`) and how (`sampler_step`): DDIM with eta = 0
    on a VP table's "trailing" timesteps, Euler steps of the flow on diffusers' flow sigmas. With labels
    and cfg_scale != 1, each step evaluates the conditional and the null-class prediction in one batch
    and mixes them: p = p_uncond + s * (p_cond - p_uncond), then rescales p towards the conditional
    prediction's std by `guidance_rescale`.
    """
    ts = schedule.sampling_timesteps(steps).to(noise.device)
    x = noise.float()
    for i in range(len(ts)):
        tt = ts[i].expand(x.shape[0])
        p = _guided_prediction(model, x, tt, labels, null_label, cfg_scale, guidance_rescale)
        x = schedule.sampler_step(x, p, tt, ts[i + 1].expand(x.shape[0]) if i + 1 < len(ts) else None)
    return x.clamp(-1, 1) if clip else x


def ddim_sample(model, schedule: NoiseSchedule, noise: torch.Tensor, **kwargs) -> torch.Tensor:
    """Deprecated alias of `sample_loop` (removed in the next release)."""
    warnings.warn("fastperc: ddim_sample is deprecated; use sample_loop (the schedule picks the step)",
                  DeprecationWarning, stacklevel=2)
    return sample_loop(model, schedule, noise, **kwargs)


def euler_flow_sample(model, schedule: NoiseSchedule, noise: torch.Tensor, **kwargs) -> torch.Tensor:
    """Deprecated alias of `sample_loop` (removed in the next release)."""
    warnings.warn("fastperc: euler_flow_sample is deprecated; use sample_loop (the schedule picks the step)",
                  DeprecationWarning, stacklevel=2)
    return sample_loop(model, schedule, noise, **kwargs)


def _guided_prediction(model, x, tt, labels, null_label, cfg_scale, guidance_rescale) -> torch.Tensor:
    """The model's prediction, with classifier-free guidance when labels and cfg_scale != 1: the
    conditional and the null-class prediction in one batch, p = p_uncond + s * (p_cond - p_uncond),
    then rescaled towards the conditional prediction's std by `guidance_rescale`."""
    guided = labels is not None and cfg_scale != 1.0
    if not guided:
        return predict(model, x, tt, labels).float()
    if null_label is None:
        raise InputError("cfg_scale: classifier-free guidance needs a conditional model with a null class")
    both = predict(model, torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, torch.full_like(labels, null_label)]))
    cond, uncond = both.float().chunk(2)
    p = uncond + cfg_scale * (cond - uncond)
    if guidance_rescale > 0:
        dims = tuple(range(1, p.dim()))
        ratio = cond.std(dim=dims, keepdim=True) / p.std(dim=dims, keepdim=True).clamp_min(1e-12)
        p = guidance_rescale * (p * ratio) + (1 - guidance_rescale) * p
    return p


def generate(model, model_config: dict, n: int, *, steps: int = 50, cfg_scale: float = 1.0,
             guidance_rescale: float = 0.0, seed: int = 0, batch_size: int = 250,
             device: torch.device | str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """n images as uint8 (N, H, W) or (N, H, W, C), and int64 labels (balanced; -1 if unconditional).
    A latent model's samples are decoded by the autoencoder stored in its model config."""
    if n < 1:
        raise InputError(f"n: expected >= 1, got {n}")
    device = torch.device(device)
    model = model.to(device).eval()
    schedule = schedule_of(model_config)
    ncls = model_config.get("num_classes")
    if cfg_scale != 1 and not ncls:  # else the unguided images would pass for guided ones
        raise InputError(f"cfg_scale: classifier-free guidance needs a conditional model; got {cfg_scale} for an "
                         "unconditional one")
    labels = torch.arange(n) % ncls if ncls else torch.full((n,), -1)
    g = torch.Generator().manual_seed(seed)
    shape = (model_config["in_channels"], model_config["image_size"], model_config["image_size"])
    ae = latent.of_model_config(model_config)
    ae = ae.to(device) if ae is not None else None
    noise = torch.randn((n, *shape), generator=g)
    out = []
    for s in range(0, n, batch_size):
        lab = labels[s:s + batch_size].to(device) if ncls else None
        x = sample_loop(model, schedule, noise[s:s + batch_size].to(device), steps=steps, labels=lab,
                    null_label=null_class(model_config), cfg_scale=cfg_scale, guidance_rescale=guidance_rescale,
                    clip=ae is None)
        if ae is not None:
            with torch.no_grad():
                x = ae.decode(x)
        out.append(to_uint8(x).cpu())
    imgs = torch.cat(out).permute(0, 2, 3, 1).numpy()
    return (imgs[..., 0] if imgs.shape[-1] == 1 else imgs), labels.numpy().astype(np.int64)


def save_grid(images: np.ndarray, path: Path, cols: int = 10, max_images: int = 100) -> Path:
    """A PNG grid of the first `max_images` images (uint8, (N, H, W) or (N, H, W, C))."""
    from PIL import Image

    imgs = images[:max_images]
    n, h, w = imgs.shape[:3]
    rows = -(-n // cols)
    c = 1 if imgs.ndim == 3 else imgs.shape[3]
    grid = np.zeros((rows * (h + 2) + 2, cols * (w + 2) + 2) + (() if c == 1 else (c,)), dtype=np.uint8)
    for i, im in enumerate(imgs):
        r, q = divmod(i, cols)
        grid[2 + r * (h + 2):2 + r * (h + 2) + h, 2 + q * (w + 2):2 + q * (w + 2) + w] = im
    Image.fromarray(grid).save(path)
    return path


def save_samples(images: np.ndarray, labels: np.ndarray, path: str | Path) -> tuple[Path, Path]:
    """Write FILE.npz (images, labels) and FILE.png beside it (grid sorted by label when labelled)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise InputError(f"out: expected a .npz path, got {path}")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, images=images, labels=labels)
    order = np.argsort(labels, kind="stable") if (labels >= 0).all() else np.arange(len(labels))
    show = images[order] if len(images) <= 100 else images[_grid_pick(labels)]
    return path, save_grid(show, path.with_suffix(".png"))


def _grid_pick(labels: np.ndarray, per_class: int = 10) -> np.ndarray:
    """Indices for a 10x10 grid: up to 10 of each class (rows = classes), else the first 100."""
    if (labels < 0).any():
        return np.arange(min(100, len(labels)))
    picks = [np.flatnonzero(labels == c)[:per_class] for c in np.unique(labels)[:10]]
    return np.concatenate(picks)
