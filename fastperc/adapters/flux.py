"""The Flux family: diffusers FluxTransformer2DModel (joint blocks, then single blocks)."""
from __future__ import annotations

import torch

from .base import FeatureCollector, missing_attributes, missing_parameters
from .block_stack import BlockStack
from .registry import register_adapter, register_joint_block


class FluxAdapter(BlockStack):
    """diffusers.FluxTransformer2DModel on packed latents (B, N, C*4): the image and context embedders,
    the timestep (+ guidance) + pooled-text embedding and the rotary embedding of txt_ids/img_ids, then
    the joint transformer_blocks and the single_transformer_blocks up to the deepest tap (norm_out and
    proj_out cut). A block's output is its image stream: both kinds return (text, image) in this
    diffusers version. Timestep: the loss's timesteps / 1000, i.e. sigma, as diffusers' Flux training
    script passes them (the forward multiplies by 1000 again)."""

    PRELUDE = "time_text_embed|context_embedder|pos_embed"
    KWARGS = frozenset({"encoder_hidden_states", "pooled_projections", "img_ids", "txt_ids", "guidance",
                        "joint_attention_kwargs"})

    def tail(self, model):
        return ["norm_out", "proj_out"]

    def prelude(self, model):
        return ["x_embedder", self.PRELUDE]

    def blocks(self, model):
        return (super().blocks(model)
                + [f"single_transformer_blocks.{i}" for i in range(len(model.single_transformer_blocks))])

    def probe(self, model):
        problems = missing_attributes(model, ("x_embedder", "time_text_embed", "context_embedder", "pos_embed",
                                              "transformer_blocks", "single_transformer_blocks", "config"))
        if problems:
            return problems
        # Single blocks take the text stream separately and return (text, image) since diffusers 0.33;
        # before, the forward concatenated the streams and a single block returned one tensor.
        names = ("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb", "joint_attention_kwargs")
        for kind in ("transformer_blocks", "single_transformer_blocks"):
            if len(getattr(model, kind)):
                problems += missing_parameters(getattr(model, kind)[0].forward, f"{kind}.0.forward", names)
        if any(p.startswith("single_transformer_blocks") for p in problems):
            problems.append("(a single block of diffusers < 0.35 runs on the joined text + image tokens: a tap on "
                            "one holds both streams)")
        return problems

    def model_timestep(self, timestep):
        return timestep / 1000

    def required(self, model):
        needs = ("encoder_hidden_states", "pooled_projections", "img_ids", "txt_ids")
        return needs + (("guidance",) if model.config.guidance_embeds else ())

    def run(self, model, sample, timestep, keep, stop, encoder_hidden_states=None, pooled_projections=None,
            img_ids=None, txt_ids=None, guidance=None, joint_attention_kwargs=None):
        c = FeatureCollector(keep, stop)
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


register_adapter("diffusers.FluxTransformer2DModel", FluxAdapter)
register_joint_block("diffusers.FluxTransformerBlock")
register_joint_block("diffusers.FluxSingleTransformerBlock")  # (text, image) since diffusers 0.33
