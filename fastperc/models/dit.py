"""A small DiT (Peebles & Xie 2023) for the default job's transformer variant: patchify, adaLN-Zero
blocks conditioned on the timestep and the class, a linear head that unpatchifies.

Call signature and names as fastperc's UNet (`model(sample, timestep, class_labels=None)`; submodules
`x_embedder`, `time_embedding`, `class_embedding`, `blocks.i`, `norm_out`, `proj_out`), so a
FrozenTeacher taps `blocks.i` and truncates after the deepest tap. Timesteps may be integer DDPM
indices or float flow-matching timesteps (sigma * T): the sinusoidal embedding takes either.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..adapters.base import FeatureCollector
from .unet import TimestepEmbedding, condition_embedding
from ..errors import InputError


def _sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding, (grid*grid, dim)."""
    quarter = dim // 4
    freqs = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)
    pos = torch.arange(grid, dtype=torch.float64)
    yy, xx = torch.meshgrid(pos, pos, indexing="ij")
    parts = [f(c.reshape(-1, 1) * freqs) for c in (yy, xx) for f in (torch.sin, torch.cos)]
    return torch.cat(parts, dim=1).float()


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Pre-norm self-attention and MLP, each scaled, shifted and gated by the conditioning (adaLN-Zero:
    the gates start at zero, so every block starts as the identity)."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))
        self.adaLN_modulation = nn.Linear(dim, 6 * dim)
        nn.init.zeros_(self.adaLN_modulation.weight)
        nn.init.zeros_(self.adaLN_modulation.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(F.silu(cond)).chunk(6, dim=-1)
        b, n, d = x.shape
        q, k, v = self.qkv(_modulate(self.norm1(x), shift1, scale1)).view(b, n, 3, self.heads, d // self.heads).unbind(2)
        attn = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        x = x + gate1[:, None] * self.proj(attn.transpose(1, 2).reshape(b, n, d))
        return x + gate2[:, None] * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """A class-conditional (or unconditional) DiT on (B, C, H, W) images.

    Args:
        in_channels: image channels. image_size: H = W, a multiple of `patch_size`.
        patch_size: side of the square patches (tokens = (image_size / patch_size)^2).
        hidden: token width (a multiple of 4 and of `heads`). depth: number of blocks. heads: attention heads.
        num_classes: classes for conditioning (label `num_classes` is the null class for guidance), or None.

    Example:
        >>> import torch
        >>> from fastperc.models import DiT
        >>> model = DiT(num_classes=10)
        >>> model(torch.randn(2, 1, 32, 32), torch.tensor([3, 900]), class_labels=torch.tensor([0, 1])).shape
        torch.Size([2, 1, 32, 32])
    """

    def __init__(self, in_channels: int = 1, image_size: int = 32, patch_size: int = 4, hidden: int = 128,
                 depth: int = 6, heads: int = 4, num_classes: int | None = None):
        super().__init__()
        if image_size % patch_size:
            raise InputError(f"image_size: expected a multiple of patch_size={patch_size}, got {image_size}")
        if hidden % 4 or hidden % heads:
            raise InputError(f"hidden: expected a multiple of 4 and of heads={heads}, got {hidden}")
        if depth < 1:
            raise InputError(f"depth: expected >= 1, got {depth}")
        if num_classes is not None and num_classes < 1:
            raise InputError(f"num_classes: expected None or a positive int, got {num_classes}")
        self.in_channels, self.image_size, self.patch_size = in_channels, image_size, patch_size
        self.num_classes = self.null_class = num_classes
        self.grid = image_size // patch_size
        self.x_embedder = nn.Conv2d(in_channels, hidden, patch_size, stride=patch_size)
        self.register_buffer("pos_embed", _sincos_2d(hidden, self.grid)[None], persistent=False)
        self.time_embedding = TimestepEmbedding(hidden, hidden)
        self.class_embedding = nn.Embedding(num_classes + 1, hidden) if num_classes is not None else None
        self.blocks = nn.ModuleList(DiTBlock(hidden, heads) for _ in range(depth))
        self.norm_out = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.adaLN_out = nn.Linear(hidden, 2 * hidden)
        self.proj_out = nn.Linear(hidden, patch_size * patch_size * in_channels)
        for layer in (self.adaLN_out, self.proj_out):  # the model starts by predicting zero
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def stage_names(self) -> list[str]:
        """Stages in execution order; `features` can stop after any of them."""
        return (["x_embedder|time_embedding|class_embedding"] + [f"blocks.{i}" for i in range(len(self.blocks))]
                + ["norm_out|adaLN_out|proj_out"])

    def features(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None, *,
                 keep: frozenset[str] = frozenset(), stop: str | None = None):
        """Run stage by stage; return ({name: output} for stages in `keep`, final output or None).
        Block outputs are token maps (B, tokens, hidden). With `stop`, nothing after that stage runs."""
        taps = FeatureCollector(keep, stop)
        cond = condition_embedding(self, sample, timestep, class_labels)
        x = self.x_embedder(sample).flatten(2).transpose(1, 2) + self.pos_embed.to(sample.dtype)
        if taps.step(self.stage_names()[0], x):
            return taps.out, None
        for i, block in enumerate(self.blocks):
            x = block(x, cond)
            if taps.step(f"blocks.{i}", x):
                return taps.out, None
        shift, scale = self.adaLN_out(F.silu(cond)).chunk(2, dim=-1)
        x = self.proj_out(_modulate(self.norm_out(x), shift, scale))
        p, c, g = self.patch_size, self.in_channels, self.grid
        x = x.view(-1, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(-1, c, g * p, g * p)
        return taps.out, x

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if sample.dim() != 4 or sample.shape[1:] != (self.in_channels, self.image_size, self.image_size):
            raise InputError(f"sample: expected shape (B, {self.in_channels}, {self.image_size}, {self.image_size}), "
                             f"got {tuple(sample.shape)}")
        return self.features(sample, timestep, class_labels)[1]


__all__ = ["DiT", "DiTBlock"]
