"""A latent space like the paper's, at MNIST scale: a small convolutional autoencoder trained on the
data, whose decoder makes the pixels while the diffusion model (and its frozen teacher) work on the
latents.

`train_autoencoder` fits it with MSE on the training split (the held-out digits are never seen) and
stores the latents' scale (1 / their standard deviation, as Stable Diffusion's VAE factor), so that the
diffusion model sees latents of unit variance. `fastperc train --latent AE` then encodes the data once,
trains in latent space and stores the autoencoder inside the diffusion checkpoint's model config, so
every later fine-tune, sample and evaluation of that checkpoint decodes with the same weights.

Example (a tiny autoencoder, a few steps):

    >>> import tempfile, torch
    >>> from fastperc.recipes.latent import train_autoencoder, load_autoencoder
    >>> out = tempfile.mkdtemp()
    >>> r = train_autoencoder(out, steps=2, batch_size=8, width=8, progress=False)
    >>> ae = load_autoencoder(out)
    >>> z = ae.encode(torch.rand(2, 1, 32, 32) * 2 - 1)
    >>> tuple(z.shape), tuple(ae.decode(z).shape)
    ((2, 4, 8, 8), (2, 1, 32, 32))
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from . import checkpoint, data
from ..errors import InputError, MissingFileError


class Autoencoder(nn.Module):
    """(B, C, S, S) images in [-1, 1] <-> (B, latent_channels, S/4, S/4) latents of unit variance."""

    def __init__(self, in_channels: int = 1, latent_channels: int = 4, width: int = 64, scale: float = 1.0):
        super().__init__()
        w = width
        self.config = {"in_channels": in_channels, "latent_channels": latent_channels, "width": width}
        self.encoder = nn.Sequential(
            nn.Conv2d(in_channels, w // 2, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w // 2, w, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(w, latent_channels, 3, padding=1))
        self.decoder = nn.Sequential(
            nn.Conv2d(latent_channels, w, 3, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(w, w, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.SiLU(),
            nn.ConvTranspose2d(w, w // 2, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(w // 2, in_channels, 3, padding=1), nn.Tanh())
        self.register_buffer("scale", torch.tensor(float(scale)))  # latents are multiplied by it after encoding

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.encoder(x) * self.scale

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(z / self.scale)

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        if image_size % 4:
            raise InputError(f"image_size: the autoencoder halves it twice, expected a multiple of 4, got {image_size}")
        return self.config["latent_channels"], image_size // 4, image_size // 4


def train_autoencoder(out: str, *, steps: int = 2000, batch_size: int = 64, lr: float = 2e-3, width: int = 32,
                      latent_channels: int = 4, seed: int = 0, data_path: str | None = None, image_size: int = 32,
                      channels: int = 1, held_out: int = 500, split_seed: int = 0, progress: bool = True) -> dict:
    """Fit the autoencoder on the training split with MSE; save `out`/autoencoder.pt with the latent
    scale and the held-out reconstruction MSE; returns {"held_out_mse", "scale", "checkpoint"}."""
    if steps < 1:
        raise InputError(f"steps: expected >= 1, got {steps}")
    torch.manual_seed(seed)
    images = data.load(data_path, image_size, channels)
    train_set, test_set = images.split(min(held_out, len(images) // 10), split_seed)
    x = data.to_model_range(train_set.images)
    ae = Autoencoder(channels, latent_channels, width)
    opt = torch.optim.AdamW(ae.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    g = torch.Generator().manual_seed(seed)
    t0 = time.time()
    for step in range(steps):
        batch = x[torch.randint(0, len(x), (batch_size,), generator=g)]
        z = ae.encoder(batch)
        # A small penalty on the latents keeps them near the origin (a KL term's job in SD's VAE) so the
        # scale below is stable and the diffusion model's noise covers them.
        loss = F.mse_loss(ae.decoder(z), batch) + 1e-4 * z.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress and (step + 1) % max(1, steps // 10) == 0:
            print(f"autoencoder step {step + 1}/{steps}: loss {loss.item():.5f}")
    ae.eval()
    with torch.no_grad():
        z = torch.cat([ae.encoder(b) for b in x.split(500)])
        ae.scale.fill_(1.0 / float(z.std()))
        test = data.to_model_range(test_set.images)
        held_out_mse = float(torch.cat([(ae.decode(ae.encode(b)) - b).pow(2).flatten(1).mean(1)
                                        for b in test.split(500)]).mean())
    path = checkpoint.save({"autoencoder": ae.state_dict(), "config": ae.config, "held_out_mse": held_out_mse,
                            "image_size": image_size, "seconds": round(time.time() - t0, 1)},
                           Path(out) / "autoencoder.pt")
    return {"held_out_mse": held_out_mse, "scale": float(ae.scale), "checkpoint": str(path)}


def load_autoencoder(path: str) -> Autoencoder:
    """An autoencoder from `train_autoencoder` (its folder or autoencoder.pt), in eval mode."""
    p = Path(path)
    p = p / "autoencoder.pt" if p.is_dir() else p
    if not p.exists():
        raise MissingFileError(f"latent: no autoencoder at {path}; train one with `fastperc train-autoencoder "
                                "--out DIR` and pass that folder")
    return from_state(checkpoint.load(p))


def from_state(state: dict) -> Autoencoder:
    """Rebuild from {"autoencoder": state_dict, "config": ...} (a checkpoint or a model config's copy)."""
    ae = Autoencoder(**state["config"])
    ae.load_state_dict(state["autoencoder"])
    return ae.eval().requires_grad_(False)


def of_model_config(model_config: dict) -> Autoencoder | None:
    """The autoencoder a latent diffusion checkpoint decodes with, or None for a pixel-space model."""
    state = model_config.get("autoencoder")
    return None if state is None else from_state(state)


@torch.no_grad()
def encode_images(ae: Autoencoder, x: torch.Tensor, batch: int = 500) -> torch.Tensor:
    """Model-range images (N, C, S, S) -> scaled latents, in batches."""
    return torch.cat([ae.encode(b) for b in x.split(batch)])
