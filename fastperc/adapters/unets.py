"""The UNet family: diffusers UNet2DModel and UNet2DConditionModel (SD 1.x/2.x, SDXL), encoder and
midblock (decoder taps use the teacher's hook path)."""
from __future__ import annotations

import torch

from ..errors import InputError
from .base import Adapter, FeatureCollector, missing_attributes, missing_parameters, timesteps_for
from .registry import register_adapter


class DiffusersUNet2DAdapter(Adapter):
    """diffusers.UNet2DModel, encoder and midblock (decoder taps use the generic path)."""

    PRELUDE = "time_proj|time_embedding|class_embedding"

    def stages(self, model):
        return [self.PRELUDE, "conv_in"] + [f"down_blocks.{i}" for i in range(len(model.down_blocks))] + ["mid_block"]

    def tail(self, model):
        return ["up_blocks", "conv_norm_out", "conv_act", "conv_out"]  # the decoder and output head

    def probe(self, model):
        problems = missing_attributes(model, ("time_proj", "time_embedding", "class_embedding", "conv_in",
                                              "down_blocks", "mid_block", "config"))
        if not problems:
            problems += [p for i, b in enumerate(model.down_blocks)
                         for p in missing_parameters(b.forward, f"down_blocks.{i}.forward", ("hidden_states", "temb"))]
        return problems

    def supports(self, kwargs):
        return set(kwargs) <= {"class_labels"}

    def required(self, model):
        return ("class_labels",) if model.class_embedding is not None else ()

    def run(self, model, sample, timestep, keep, stop, class_labels=None):
        c = FeatureCollector(keep, stop)
        if model.config.center_input_sample:
            sample = 2 * sample - 1.0
        emb = model.time_embedding(model.time_proj(timesteps_for(sample, timestep)).to(dtype=model.dtype))
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

    def tail(self, model):
        return ["up_blocks", "conv_norm_out", "conv_act", "conv_out"]  # the decoder and output head

    def probe(self, model):
        # The prelude helpers arrived in diffusers 0.26; older UNets inline them in forward.
        problems = missing_attributes(model, ("get_time_embed", "get_class_embed", "get_aug_embed",
                                              "process_encoder_hidden_states", "time_embed_act", "conv_in",
                                              "down_blocks", "mid_block", "config"))
        if not problems:
            attn = ("hidden_states", "temb", "encoder_hidden_states", "attention_mask", "cross_attention_kwargs",
                    "encoder_attention_mask")
            for i, b in enumerate(model.down_blocks):
                names = attn if getattr(b, "has_cross_attention", False) else attn[:2]
                problems += missing_parameters(b.forward, f"down_blocks.{i}.forward", names)
        return problems

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
        c = FeatureCollector(keep, stop)
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


register_adapter("diffusers.UNet2DModel", DiffusersUNet2DAdapter)
register_adapter("diffusers.UNet2DConditionModel", DiffusersUNet2DConditionAdapter)
