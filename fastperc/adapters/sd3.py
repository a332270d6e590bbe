"""The SD3 family: diffusers SD3Transformer2DModel (SD3, SD3.5), joint text-image blocks."""
from __future__ import annotations

from .base import FeatureCollector, missing_attributes, missing_parameters
from .block_stack import BlockStack
from .registry import register_adapter, register_joint_block


class SD3Adapter(BlockStack):
    """diffusers.SD3Transformer2DModel (SD3, and SD3.5's dual-attention blocks and qk norm, which live
    inside the blocks): patch embedding, the timestep + pooled-text embedding and the context embedder,
    then the joint transformer_blocks up to the deepest tap (norm_out, proj_out and unpatchify cut). A
    block's output is its image stream: joint blocks return (text, image), the last (context_pre_only)
    one (None, image). Timestep: as given; diffusers' SD3 training script passes the flow-matching
    scheduler's timesteps, sigma * 1000, which is what the loss passes for a flow-matching schedule."""

    PRELUDE = "time_text_embed|context_embedder"
    KWARGS = frozenset({"encoder_hidden_states", "pooled_projections", "joint_attention_kwargs"})

    def tail(self, model):
        return ["norm_out", "proj_out"]

    def prelude(self, model):
        return ["pos_embed", self.PRELUDE]

    def required(self, model):
        return ("encoder_hidden_states", "pooled_projections")

    def probe(self, model):
        problems = missing_attributes(model, ("pos_embed", "time_text_embed", "context_embedder", "transformer_blocks"))
        if not problems and len(model.transformer_blocks):
            problems += missing_parameters(model.transformer_blocks[0].forward, "transformer_blocks.0.forward",
                                           ("hidden_states", "encoder_hidden_states", "temb",
                                            "joint_attention_kwargs"))
        return problems

    def run(self, model, sample, timestep, keep, stop, encoder_hidden_states=None, pooled_projections=None,
            joint_attention_kwargs=None):
        c = FeatureCollector(keep, stop)
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


register_adapter("diffusers.SD3Transformer2DModel", SD3Adapter)
register_joint_block("diffusers.JointTransformerBlock")  # returns (text, image); the last (None, image)
