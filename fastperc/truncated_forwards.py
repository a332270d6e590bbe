"""Truncated forwards for known architectures: run stage by stage and stop after a given stage.

Each adapter lists its stages (top-level submodule names in execution order) and runs them without
exceptions or hooks, so `torch.compile` sees one straight-line graph. Models or call arguments an
adapter does not cover return None from `find_adapter`/`supports`, and the teacher uses its generic
hook path instead.

Covered: fastperc's UNet and DiT, diffusers UNet2DModel / UNet2DConditionModel (encoder and midblock), and the
diffusers transformers DiTTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel (SD3 and
SD3.5) and FluxTransformer2DModel (every block). Each adapter also says which timestep its model's
forward takes (`model_timestep`); a joint text-image block's tap is its image stream (`joint_blocks`).
"""
from __future__ import annotations

from .errors import InputError

import functools
from abc import ABC, abstractmethod
from typing import Any

import torch
from torch import nn

from .models.dit import DiT
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

    def required(self, model: nn.Module) -> tuple[str, ...]:
        """The keyword inputs this model cannot run without (its conditioning): checked by the loss
        before the teacher runs, so a missing one is named as such."""
        return ()

    def model_timestep(self, timestep):
        """The timestep the model's forward takes, from the one the loss passes the teacher (the
        schedule's timesteps: DDPM indices, or sigma * 1000 for flow matching). Default: as given."""
        return timestep

    def blocks(self, model: nn.Module) -> list[str]:
        """The transformer's block stack in execution order ([] for UNets: they have a midblock)."""
        return []

    @abstractmethod
    def run(self, model, sample, timestep, keep: frozenset[str], stop: str, **kwargs) -> dict[str, torch.Tensor]:
        """Outputs of the stages in `keep` (a joint block's: its image stream); nothing after `stop` runs.
        `timestep` is already the model's (`model_timestep`)."""


class FastpercUNetAdapter(Adapter):
    def stages(self, model: UNet) -> list[str]:
        return model.stage_names()

    def supports(self, kwargs):
        return set(kwargs) <= {"class_labels"}

    def run(self, model, sample, timestep, keep, stop, **kwargs):
        return model.features(sample, timestep, kwargs.get("class_labels"), keep=keep, stop=stop)[0]


class FastpercDiTAdapter(Adapter):
    """fastperc's DiT: the patch/time/class embeddings, then blocks up to the deepest tap (the final
    norm and unpatchify are cut). Timestep: as given (DDPM index or flow timestep sigma * T)."""

    def stages(self, model: DiT) -> list[str]:
        return model.stage_names()[:-1]

    def blocks(self, model: DiT) -> list[str]:
        return [f"blocks.{i}" for i in range(len(model.blocks))]

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

    def required(self, model):
        return ("class_labels",) if model.class_embedding is not None else ()

    def run(self, model, sample, timestep, keep, stop, class_labels=None):
        c = _Collect(keep, stop)
        if model.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = model.time_embedding(model.time_proj(_timesteps_for(sample, timestep)).to(dtype=model.dtype))
        if model.class_embedding is not None:
            if class_labels is None:
                raise InputError("class_labels should be provided when doing class conditioning")
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

    def required(self, model):
        needs = ["encoder_hidden_states"]
        if model.class_embedding is not None:
            needs.append("class_labels")
        if model.config.addition_embed_type is not None:  # SDXL's text_time: text_embeds and time_ids
            needs.append("added_cond_kwargs")
        return tuple(needs)

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


# ---- transformers ----------------------------------------------------------------------------------

def _plain_attention_kwargs(attention_kwargs) -> bool:
    """Attention kwargs the blocks take as they are. A LoRA `scale` (applied by the model's forward
    decorator) and IP-Adapter embeddings (projected by the forward) need the full forward: hook path."""
    return attention_kwargs is None or not {"scale", "ip_adapter_image_embeds"} & set(attention_kwargs)


class _BlockStack(Adapter):
    """A transformer: prelude stages (patch and condition embeddings), then its blocks one stage each."""

    KWARGS: frozenset[str] = frozenset()
    ATTENTION_KWARGS = "joint_attention_kwargs"

    @abstractmethod
    def prelude(self, model) -> list[str]:
        """The stages before the first block (patch, time and text embeddings)."""

    def blocks(self, model):
        return [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]

    def stages(self, model):
        return self.prelude(model) + self.blocks(model)

    def supports(self, kwargs):
        return set(kwargs) <= self.KWARGS and _plain_attention_kwargs(kwargs.get(self.ATTENTION_KWARGS))


class DiTAdapter(_BlockStack):
    """diffusers.DiTTransformer2DModel: patch embedding, then transformer_blocks up to the deepest tap
    (the final norm, projection and unpatchify are cut). Timestep: the integer DDPM index, as given
    (each block embeds it with the class label itself)."""

    KWARGS = frozenset({"class_labels", "cross_attention_kwargs"})
    ATTENTION_KWARGS = "cross_attention_kwargs"

    def required(self, model):
        return ("class_labels",)  # adaLN-Zero embeds the label with the timestep in every block

    def prelude(self, model):
        return ["pos_embed"]

    def run(self, model, sample, timestep, keep, stop, class_labels=None, cross_attention_kwargs=None):
        c = _Collect(keep, stop)
        h = model.pos_embed(sample)
        if c.step("pos_embed", h):
            return c.out
        for i, block in enumerate(model.transformer_blocks):
            h = block(h, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                      timestep=timestep, cross_attention_kwargs=cross_attention_kwargs, class_labels=class_labels)
            if c.step(f"transformer_blocks.{i}", h):
                return c.out
        return c.out


class PixArtAdapter(_BlockStack):
    """diffusers.PixArtTransformer2DModel: patch embedding, the adaLN-single timestep (and resolution /
    aspect-ratio) embedding and the caption projection, then transformer_blocks up to the deepest tap
    (output modulation and unpatchify cut). Timestep: the integer DDPM index, as given."""

    PRELUDE = "adaln_single|caption_projection"
    KWARGS = frozenset({"encoder_hidden_states", "added_cond_kwargs", "cross_attention_kwargs", "attention_mask",
                        "encoder_attention_mask"})
    ATTENTION_KWARGS = "cross_attention_kwargs"

    def prelude(self, model):
        return ["pos_embed", self.PRELUDE]

    def required(self, model):
        return ("encoder_hidden_states",) + (("added_cond_kwargs",) if model.use_additional_conditions else ())

    def run(self, model, sample, timestep, keep, stop, encoder_hidden_states=None, added_cond_kwargs=None,
            cross_attention_kwargs=None, attention_mask=None, encoder_attention_mask=None):
        c = _Collect(keep, stop)
        if model.use_additional_conditions and added_cond_kwargs is None:
            raise InputError("`added_cond_kwargs` cannot be None when using additional conditions for `adaln_single`.")
        # Masks (1 keep, 0 discard) become additive biases, as the model's forward makes them.
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = ((1 - attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        if encoder_attention_mask is not None and encoder_attention_mask.ndim == 2:
            encoder_attention_mask = ((1 - encoder_attention_mask.to(sample.dtype)) * -10000.0).unsqueeze(1)
        batch = sample.shape[0]
        h = model.pos_embed(sample)
        if c.step("pos_embed", h):
            return c.out
        t_mod, _ = model.adaln_single(timestep, added_cond_kwargs, batch_size=batch, hidden_dtype=h.dtype)
        if model.caption_projection is not None:
            encoder_hidden_states = model.caption_projection(encoder_hidden_states).view(batch, -1, h.shape[-1])
        if c.step(self.PRELUDE, t_mod):
            return c.out
        for i, block in enumerate(model.transformer_blocks):
            h = block(h, attention_mask=attention_mask, encoder_hidden_states=encoder_hidden_states,
                      encoder_attention_mask=encoder_attention_mask, timestep=t_mod,
                      cross_attention_kwargs=cross_attention_kwargs, class_labels=None)
            if c.step(f"transformer_blocks.{i}", h):
                return c.out
        return c.out


class SD3Adapter(_BlockStack):
    """diffusers.SD3Transformer2DModel (SD3, and SD3.5's dual-attention blocks and qk norm, which live
    inside the blocks): patch embedding, the timestep + pooled-text embedding and the context embedder,
    then the joint transformer_blocks up to the deepest tap (norm_out, proj_out and unpatchify cut). A
    block's output is its image stream: joint blocks return (text, image), the last (context_pre_only)
    one (None, image). Timestep: as given; diffusers' SD3 training script passes the flow-matching
    scheduler's timesteps, sigma * 1000, which is what the loss passes for a flow-matching schedule."""

    PRELUDE = "time_text_embed|context_embedder"
    KWARGS = frozenset({"encoder_hidden_states", "pooled_projections", "joint_attention_kwargs"})

    def prelude(self, model):
        return ["pos_embed", self.PRELUDE]

    def required(self, model):
        return ("encoder_hidden_states", "pooled_projections")

    def run(self, model, sample, timestep, keep, stop, encoder_hidden_states=None, pooled_projections=None,
            joint_attention_kwargs=None):
        c = _Collect(keep, stop)
        h = model.pos_embed(sample).contiguous()  # contiguous as the forward makes it (PatchEmbed transposes)
        if c.step("pos_embed", h):
            return c.out
        temb = model.time_text_embed(timestep, pooled_projections)
        context = model.context_embedder(encoder_hidden_states)
        if c.step(self.PRELUDE, temb):
            return c.out
        for i, block in enumerate(model.transformer_blocks):
            context, h = block(hidden_states=h, encoder_hidden_states=context, temb=temb,
                               joint_attention_kwargs=joint_attention_kwargs)
            if c.step(f"transformer_blocks.{i}", h):
                return c.out
        return c.out


class FluxAdapter(_BlockStack):
    """diffusers.FluxTransformer2DModel on packed latents (B, N, C*4): the image and context embedders,
    the timestep (+ guidance) + pooled-text embedding and the rotary embedding of txt_ids/img_ids, then
    the joint transformer_blocks and the single_transformer_blocks up to the deepest tap (norm_out and
    proj_out cut). A block's output is its image stream: both kinds return (text, image) in this
    diffusers version. Timestep: the loss's timesteps / 1000, i.e. sigma, as diffusers' Flux training
    script passes them (the forward multiplies by 1000 again)."""

    PRELUDE = "time_text_embed|context_embedder|pos_embed"
    KWARGS = frozenset({"encoder_hidden_states", "pooled_projections", "img_ids", "txt_ids", "guidance",
                        "joint_attention_kwargs"})

    def prelude(self, model):
        return ["x_embedder", self.PRELUDE]

    def blocks(self, model):
        return (super().blocks(model)
                + [f"single_transformer_blocks.{i}" for i in range(len(model.single_transformer_blocks))])

    def model_timestep(self, timestep):
        return timestep / 1000

    def required(self, model):
        needs = ("encoder_hidden_states", "pooled_projections", "img_ids", "txt_ids")
        return needs + (("guidance",) if model.config.guidance_embeds else ())

    def run(self, model, sample, timestep, keep, stop, encoder_hidden_states=None, pooled_projections=None,
            img_ids=None, txt_ids=None, guidance=None, joint_attention_kwargs=None):
        c = _Collect(keep, stop)
        h = model.x_embedder(sample)
        if c.step("x_embedder", h):
            return c.out
        # As the forward does: time and guidance in the hidden dtype, scaled back to 0..1000.
        timestep = timestep.to(h.dtype) * 1000
        if guidance is None:
            temb = model.time_text_embed(timestep, pooled_projections)
        else:
            temb = model.time_text_embed(timestep, guidance.to(h.dtype) * 1000, pooled_projections)
        context = model.context_embedder(encoder_hidden_states)
        # 3-D ids (a batch dimension) are deprecated; the forward takes the first, so do we.
        txt_ids = txt_ids[0] if txt_ids.ndim == 3 else txt_ids
        img_ids = img_ids[0] if img_ids.ndim == 3 else img_ids
        rotary = model.pos_embed(torch.cat((txt_ids, img_ids), dim=0))
        if c.step(self.PRELUDE, temb):
            return c.out
        for kind in ("transformer_blocks", "single_transformer_blocks"):
            for i, block in enumerate(getattr(model, kind)):
                context, h = block(hidden_states=h, encoder_hidden_states=context, temb=temb,
                                   image_rotary_emb=rotary, joint_attention_kwargs=joint_attention_kwargs)
                if c.step(f"{kind}.{i}", h):
                    return c.out
        return c.out


@functools.lru_cache(maxsize=None)
def joint_blocks() -> tuple[type, ...]:
    """Block classes whose output is a (text, image) tuple; a tap on one gives output[1], the image
    stream (the first element, what other tuple outputs give, would be the text stream). Checked
    against this diffusers version's sources: SD3's JointTransformerBlock (its last block returns
    (None, image)), Flux's FluxTransformerBlock and FluxSingleTransformerBlock."""
    try:
        from diffusers.models.attention import JointTransformerBlock
        from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
    except ImportError:
        return ()
    return JointTransformerBlock, FluxTransformerBlock, FluxSingleTransformerBlock


def find_adapter(model: nn.Module) -> Adapter | None:
    """The truncated forward for `model`'s exact class, or None (generic hook path)."""
    if type(model) is UNet:
        return FastpercUNetAdapter()
    if type(model) is DiT:
        return FastpercDiTAdapter()
    try:
        import diffusers
    except ImportError:
        return None
    if type(model) is diffusers.UNet2DModel:
        return DiffusersUNet2DAdapter()
    if type(model) is diffusers.UNet2DConditionModel and all(
            hasattr(model, m) for m in ("get_time_embed", "get_class_embed", "get_aug_embed",
                                        "process_encoder_hidden_states")):
        return DiffusersUNet2DConditionAdapter()
    transformers = {"DiTTransformer2DModel": DiTAdapter, "PixArtTransformer2DModel": PixArtAdapter,
                    "SD3Transformer2DModel": SD3Adapter, "FluxTransformer2DModel": FluxAdapter}
    for name, adapter in transformers.items():
        if type(model) is getattr(diffusers, name, None):
            return adapter()
    return None
