"""A small UNet for the default job (1-channel 32x32 by default, about 2 M parameters).

Layout and call signature follow diffusers (`model(sample, timestep, class_labels=None)`, submodules
`time_embedding`, `class_embedding`, `conv_in`, `down_blocks.i`, `mid_block`, `up_blocks.i`,
`conv_norm_out`, `conv_out`), so a FrozenTeacher taps it by the same names as a diffusers UNet.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from ..adapters.base import FeatureCollector
from ..errors import InputError


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding (B,) -> (B, dim), cos then sin, as in DDPM/diffusers (flip_sin_to_cos)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=timesteps.device, dtype=torch.float32) / half)
    args = timesteps.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def condition_embedding(model: nn.Module, sample: torch.Tensor, timestep, class_labels) -> torch.Tensor:
    """The time embedding plus the class embedding of fastperc's models (`model.time_embedding`,
    `model.class_embedding` or None, `model.null_class`): missing labels mean the null class; labels
    given to an unconditional model are refused. A scalar timestep applies to the whole batch."""
    t = torch.as_tensor(timestep, device=sample.device)
    t = t.expand(sample.shape[0]) if t.dim() == 0 else t
    emb = model.time_embedding(t)
    if model.class_embedding is not None:
        if class_labels is None:
            class_labels = torch.full((sample.shape[0],), model.null_class, device=sample.device, dtype=torch.long)
        emb = emb + model.class_embedding(class_labels)
    elif class_labels is not None:
        raise InputError(f"class_labels: this {type(model).__name__} is unconditional (num_classes=None), "
                         "got class labels")
    return emb


class TimestepEmbedding(nn.Module):
    def __init__(self, dim: int, out_dim: int):
        super().__init__()
        self.dim = dim
        self.linear_1 = nn.Linear(dim, out_dim)
        self.linear_2 = nn.Linear(out_dim, out_dim)

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(timesteps, self.dim).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(emb)))


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, time embedding added, GroupNorm -> SiLU -> dropout -> conv, skip."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, groups: int, dropout: float = 0.0):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.conv_shortcut(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over spatial positions, pre-GroupNorm, residual."""

    def __init__(self, ch: int, groups: int, head_dim: int = 32):
        super().__init__()
        self.heads = max(1, ch // head_dim)
        self.norm = nn.GroupNorm(groups, ch)
        self.to_qkv = nn.Conv2d(ch, 3 * ch, 1)
        self.to_out = nn.Conv2d(ch, ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.to_qkv(self.norm(x)).reshape(b, 3, self.heads, c // self.heads, h * w).unbind(1)
        out = F.scaled_dot_product_attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        return x + self.to_out(out.transpose(-1, -2).reshape(b, c, h, w))


class DownBlock(nn.Module):
    """Resnets (+ attention), then an optional stride-2 conv. Returns (hidden, skips)."""

    def __init__(self, in_ch, out_ch, temb_ch, groups, num_layers, attention, downsample, dropout):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, temb_ch, groups, dropout) for i in range(num_layers))
        self.attentions = nn.ModuleList(AttentionBlock(out_ch, groups) for _ in range(num_layers)) if attention else None
        self.downsample = nn.Conv2d(out_ch, out_ch, 3, stride=2, padding=1) if downsample else None

    def forward(self, x, temb):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x)
            skips.append(x)
        if self.downsample is not None:
            x = self.downsample(x)
            skips.append(x)
        return x, tuple(skips)


class MidBlock(nn.Module):
    def __init__(self, ch, temb_ch, groups, dropout):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(ch, ch, temb_ch, groups, dropout),
                                      ResnetBlock(ch, ch, temb_ch, groups, dropout)])
        self.attention = AttentionBlock(ch, groups)

    def forward(self, x, temb):
        return self.resnets[1](self.attention(self.resnets[0](x, temb)), temb)


class UpBlock(nn.Module):
    """Resnets over [hidden, skip] concatenations (+ attention), then optional nearest-2x upsample."""

    def __init__(self, in_ch, out_ch, skip_chs, temb_ch, groups, attention, upsample, dropout):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock((in_ch if i == 0 else out_ch) + s, out_ch, temb_ch, groups, dropout) for i, s in enumerate(skip_chs))
        self.attentions = nn.ModuleList(AttentionBlock(out_ch, groups) for _ in skip_chs) if attention else None
        self.upsample = nn.Conv2d(out_ch, out_ch, 3, padding=1) if upsample else None

    def forward(self, x, skips, temb):
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips[-1 - i]], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x)
        if self.upsample is not None:
            x = self.upsample(F.interpolate(x, scale_factor=2.0, mode="nearest"))
        return x


class UNet(nn.Module):
    """Small conditional or unconditional UNet, called like a diffusers UNet.

    Args:
        in_channels, out_channels: image channels (1 for MNIST-like data).
        block_channels: channels per resolution level; the input is downsampled len-1 times.
        layers_per_block: resnets per down level (up levels have one more, for the skip of the downsample).
        attention_levels: indices of levels with self-attention (default: the lowest resolution).
        num_classes: None for an unconditional model; else class conditioning with an extra null
            class (index `num_classes`) used when `class_labels` is None, for classifier-free guidance.
        norm_groups, dropout: GroupNorm groups and resnet dropout.

    Example:
        >>> import torch
        >>> from fastperc.models import UNet
        >>> model = UNet(num_classes=10)
        >>> x, t = torch.randn(4, 1, 32, 32), torch.randint(0, 1000, (4,))
        >>> model(x, t, class_labels=torch.tensor([0, 1, 2, 3])).shape
        torch.Size([4, 1, 32, 32])
    """

    def __init__(self, in_channels: int = 1, out_channels: int | None = None,
                 block_channels: Sequence[int] = (32, 64, 128), layers_per_block: int = 1,
                 attention_levels: Sequence[int] | None = None, num_classes: int | None = None,
                 norm_groups: int = 8, dropout: float = 0.0):
        super().__init__()
        if not block_channels or any(c % norm_groups for c in block_channels):
            raise InputError(f"block_channels: expected a non-empty sequence of multiples of norm_groups={norm_groups}, "
                             f"got {tuple(block_channels)}")
        if num_classes is not None and num_classes < 1:
            raise InputError(f"num_classes: expected None or a positive int, got {num_classes}")
        levels = len(block_channels)
        attention_levels = (levels - 1,) if attention_levels is None else tuple(attention_levels)
        self.in_channels, self.out_channels = in_channels, out_channels or in_channels
        self.num_classes = num_classes
        self.null_class = num_classes
        self.sample_divisor = 2 ** (levels - 1)
        ch0, temb_ch = block_channels[0], 4 * block_channels[0]

        self.time_embedding = TimestepEmbedding(ch0, temb_ch)
        self.class_embedding = nn.Embedding(num_classes + 1, temb_ch) if num_classes is not None else None
        self.conv_in = nn.Conv2d(in_channels, ch0, 3, padding=1)

        self.down_blocks = nn.ModuleList()
        skip_chs, ch = [ch0], ch0
        for i, out_ch in enumerate(block_channels):
            last = i == levels - 1
            self.down_blocks.append(DownBlock(ch, out_ch, temb_ch, norm_groups, layers_per_block,
                                              i in attention_levels, not last, dropout))
            skip_chs += [out_ch] * (layers_per_block + (0 if last else 1))
            ch = out_ch
        self.mid_block = MidBlock(ch, temb_ch, norm_groups, dropout)
        self.up_blocks = nn.ModuleList()
        for i, out_ch in reversed(list(enumerate(block_channels))):
            n = layers_per_block + 1
            block_skips, skip_chs = skip_chs[-n:][::-1], skip_chs[:-n]
            self.up_blocks.append(UpBlock(ch, out_ch, block_skips, temb_ch, norm_groups, i in attention_levels,
                                          i != 0, dropout))
            ch = out_ch
        self.conv_norm_out = nn.GroupNorm(norm_groups, ch)
        self.conv_out = nn.Conv2d(ch, self.out_channels, 3, padding=1)

    # Stage names in execution order; `features` can stop after any of them.
    def stage_names(self) -> list[str]:
        return (["time_embedding", "class_embedding", "conv_in"]
                + [f"down_blocks.{i}" for i in range(len(self.down_blocks))] + ["mid_block"]
                + [f"up_blocks.{i}" for i in range(len(self.up_blocks))] + ["conv_norm_out", "conv_out"])

    def _embed(self, sample, timestep, class_labels):
        return condition_embedding(self, sample, timestep, class_labels)

    def features(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None, *,
                 keep: frozenset[str] = frozenset(), stop: str | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """Run stage by stage; return ({name: output} for stages in `keep}, final output or None).

        With `stop`, nothing after that stage runs (used by FrozenTeacher to skip the decoder).
        """
        c = FeatureCollector(keep, stop)
        emb = self._embed(sample, timestep, class_labels)
        if c.step("time_embedding", emb) or c.step("class_embedding", emb):
            return c.out, None
        h = self.conv_in(sample)
        if c.step("conv_in", h):
            return c.out, None
        skips = [h]
        for i, block in enumerate(self.down_blocks):
            h, res = block(h, emb)
            skips.extend(res)
            if c.step(f"down_blocks.{i}", h):
                return c.out, None
        h = self.mid_block(h, emb)
        if c.step("mid_block", h):
            return c.out, None
        for i, block in enumerate(self.up_blocks):
            n = len(block.resnets)
            h = block(h, skips[-n:], emb)
            skips = skips[:-n]
            if c.step(f"up_blocks.{i}", h):
                return c.out, None
        h = self.conv_norm_out(h)
        if c.step("conv_norm_out", h):
            return c.out, None
        h = self.conv_out(F.silu(h))
        c.step("conv_out", h)
        return c.out, h

    def forward(self, sample: torch.Tensor, timestep, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        if sample.dim() != 4 or sample.shape[1] != self.in_channels:
            raise InputError(f"sample: expected shape (B, {self.in_channels}, H, W), got {tuple(sample.shape)}")
        if sample.shape[-1] % self.sample_divisor or sample.shape[-2] % self.sample_divisor:
            raise InputError(f"sample: expected H and W divisible by {self.sample_divisor}, got {tuple(sample.shape[-2:])}")
        return self.features(sample, timestep, class_labels)[1]
