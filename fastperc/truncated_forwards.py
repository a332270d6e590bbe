"""Truncated forwards for known architectures: run stage by stage and stop after a given stage.

Each adapter lists its stages (top-level submodule names in execution order) and runs them without
exceptions or hooks, so `torch.compile` sees one straight-line graph. Models or call arguments an
adapter does not cover return None from `find_adapter`/`supports`, and the teacher uses its generic
hook path instead.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from .models.unet import UNet


class Adapter(ABC):
    """Truncated forward of one architecture."""

    @abstractmethod
    def stages(self, model: nn.Module) -> list[str]:
        """Stage names in execution order; '|' joins several submodules run as one stage."""

    def stage_of(self, model: nn.Module, layer: str) -> int | None:
        """Index of the stage that contains `layer` (a submodule name), or None if not covered."""
        for i, stage in enumerate(self.stages(model)):
            for prefix in stage.split("|"):
                if layer == prefix or layer.startswith(prefix + "."):
                    return i
        return None

    def supports(self, kwargs: dict[str, Any]) -> bool:
        return True

    @abstractmethod
    def run(self, model, sample, timestep, keep: frozenset[str], stop: str, **kwargs) -> dict[str, torch.Tensor]:
        """Outputs of the stages in `keep`; nothing after `stop` runs."""


class FastpercUNetAdapter(Adapter):
    def stages(self, model: UNet) -> list[str]:
        return model.stage_names()

    def supports(self, kwargs):
        return set(kwargs) <= {"class_labels"}

    def run(self, model, sample, timestep, keep, stop, **kwargs):
        return model.features(sample, timestep, kwargs.get("class_labels"), keep=keep, stop=stop)[0]


def _timesteps_for(sample: torch.Tensor, timestep) -> torch.Tensor:
    t = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], dtype=torch.long, device=sample.device)
    t = t[None] if t.dim() == 0 else t
    return t.to(sample.device).expand(sample.shape[0])


class _Collect:
    """Records kept stage outputs; `step` says when the stop stage is reached."""

    def __init__(self, keep, stop):
        self.keep, self.stop, self.out = keep, stop, {}

    def step(self, name: str, value: torch.Tensor) -> bool:
        if name in self.keep:
            self.out[name] = value
        return name == self.stop


class DiffusersUNet2DAdapter(Adapter):
    """diffusers.UNet2DModel, encoder and midblock (decoder taps use the generic path)."""

    PRELUDE = "time_proj|time_embedding|class_embedding"

    def stages(self, model):
        return [self.PRELUDE, "conv_in"] + [f"down_blocks.{i}" for i in range(len(model.down_blocks))] + ["mid_block"]

    def supports(self, kwargs):
        return set(kwargs) <= {"class_labels"}

    def run(self, model, sample, timestep, keep, stop, class_labels=None):
        c = _Collect(keep, stop)
        if model.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = model.time_embedding(model.time_proj(_timesteps_for(sample, timestep)).to(dtype=model.dtype))
        if model.class_embedding is not None:
            if class_labels is None:
                raise ValueError("class_labels should be provided when doing class conditioning")
            if model.config.class_embed_type == "timestep":
                class_labels = model.time_proj(class_labels)
            emb = emb + model.class_embedding(class_labels).to(dtype=model.dtype)
        if c.step(self.PRELUDE, emb):
            return c.out
        skip_sample = sample
        sample = model.conv_in(sample)
        if c.step("conv_in", sample):
            return c.out
        for i, block in enumerate(model.down_blocks):
            if hasattr(block, "skip_conv"):
                sample, _, skip_sample = block(hidden_states=sample, temb=emb, skip_sample=skip_sample)
            else:
                sample, _ = block(hidden_states=sample, temb=emb)
            if c.step(f"down_blocks.{i}", sample):
                return c.out
        sample = model.mid_block(sample, emb)
        c.step("mid_block", sample)
        return c.out


class DiffusersUNet2DConditionAdapter(Adapter):
    """diffusers.UNet2DConditionModel (text/class/added conditioning), encoder and midblock."""

    PRELUDE = "time_proj|time_embedding|class_embedding|add_embedding|add_time_proj|encoder_hid_proj|time_embed_act"
    KWARGS = {"encoder_hidden_states", "class_labels", "timestep_cond", "attention_mask", "encoder_attention_mask",
              "cross_attention_kwargs", "added_cond_kwargs"}

    def stages(self, model):
        return [self.PRELUDE, "conv_in"] + [f"down_blocks.{i}" for i in range(len(model.down_blocks))] + ["mid_block"]

    def supports(self, kwargs):
        cak = kwargs.get("cross_attention_kwargs") or {}
        return set(kwargs) <= self.KWARGS and "gligen" not in cak

    def run(self, model, sample, timestep, keep, stop, encoder_hidden_states=None, class_labels=None,
            timestep_cond=None, attention_mask=None, encoder_attention_mask=None, cross_attention_kwargs=None,
            added_cond_kwargs=None):
        c = _Collect(keep, stop)
        if attention_mask is not None:
            attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if encoder_attention_mask is not None:
            encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if model.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = model.time_embedding(model.get_time_embed(sample=sample, timestep=timestep), timestep_cond)
        class_emb = model.get_class_embed(sample=sample, class_labels=class_labels)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if model.config.class_embeddings_concat else emb + class_emb
        aug_emb = model.get_aug_embed(emb=emb, encoder_hidden_states=encoder_hidden_states,
                                      added_cond_kwargs=added_cond_kwargs)
        if model.config.addition_embed_type == "image_hint":
            aug_emb, hint = aug_emb
            sample = torch.cat([sample, hint], dim=1)
        emb = emb + aug_emb if aug_emb is not None else emb
        if model.time_embed_act is not None:
            emb = model.time_embed_act(emb)
        encoder_hidden_states = model.process_encoder_hidden_states(
            encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs)
        if c.step(self.PRELUDE, emb):
            return c.out
        sample = model.conv_in(sample)
        if c.step("conv_in", sample):
            return c.out
        attn = dict(encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask,
                    cross_attention_kwargs=cross_attention_kwargs, encoder_attention_mask=encoder_attention_mask)
        for i, block in enumerate(model.down_blocks):
            if getattr(block, "has_cross_attention", False):
                sample, _ = block(hidden_states=sample, temb=emb, **attn)
            else:
                sample, _ = block(hidden_states=sample, temb=emb)
            if c.step(f"down_blocks.{i}", sample):
                return c.out
        if getattr(model.mid_block, "has_cross_attention", False):
            sample = model.mid_block(sample, emb, **attn)
        else:
            sample = model.mid_block(sample, emb)
        c.step("mid_block", sample)
        return c.out


def find_adapter(model: nn.Module) -> Adapter | None:
    """The truncated forward for `model`'s exact class, or None (generic hook path)."""
    if type(model) is UNet:
        return FastpercUNetAdapter()
    try:
        from diffusers import UNet2DConditionModel, UNet2DModel
    except ImportError:
        return None
    if type(model) is UNet2DModel:
        return DiffusersUNet2DAdapter()
    if type(model) is UNet2DConditionModel and all(
            hasattr(model, m) for m in ("get_time_embed", "get_class_embed", "get_aug_embed",
                                        "process_encoder_hidden_states")):
        return DiffusersUNet2DConditionAdapter()
    return None
