"""The DiT family: diffusers DiTTransformer2DModel and PixArtTransformer2DModel (patch embedding, then
transformer_blocks; the output modulation and unpatchify are cut)."""
from __future__ import annotations

from ..errors import InputError
from .base import FeatureCollector, missing_attributes, missing_parameters
from .block_stack import BlockStack
from .registry import register_adapter


class DiTAdapter(BlockStack):
    """diffusers.DiTTransformer2DModel: patch embedding, then transformer_blocks up to the deepest tap
    (the final norm, projection and unpatchify are cut). Timestep: the integer DDPM index, as given
    (each block embeds it with the class label itself)."""

    KWARGS = frozenset({"class_labels", "cross_attention_kwargs"})
    ATTENTION_KWARGS = "cross_attention_kwargs"

    def required(self, model):
        return ("class_labels",)  # adaLN-Zero embeds the label with the timestep in every block

    def prelude(self, model):
        return ["pos_embed"]

    def tail(self, model):
        return ["norm_out", "proj_out_1", "proj_out_2"]

    def probe(self, model):
        problems = missing_attributes(model, ("pos_embed", "transformer_blocks"))
        if not problems and len(model.transformer_blocks):
            problems += missing_parameters(model.transformer_blocks[0].forward, "transformer_blocks.0.forward",
                                           ("timestep", "class_labels", "cross_attention_kwargs"))
        return problems

    def run(self, model, sample, timestep, keep, stop, class_labels=None, cross_attention_kwargs=None):
        c = FeatureCollector(keep, stop)
        h = model.pos_embed(sample)
        if c.step("pos_embed", h):
            return c.out
        for i, block in enumerate(model.transformer_blocks):
            h = block(h, attention_mask=None, encoder_hidden_states=None, encoder_attention_mask=None,
                      timestep=timestep, cross_attention_kwargs=cross_attention_kwargs, class_labels=class_labels)
            if c.step(f"transformer_blocks.{i}", h):
                return c.out
        return c.out


class PixArtAdapter(BlockStack):
    """diffusers.PixArtTransformer2DModel: patch embedding, the adaLN-single timestep (and resolution /
    aspect-ratio) embedding and the caption projection, then transformer_blocks up to the deepest tap
    (output modulation and unpatchify cut). Timestep: the integer DDPM index, as given."""

    PRELUDE = "adaln_single|caption_projection"
    KWARGS = frozenset({"encoder_hidden_states", "added_cond_kwargs", "cross_attention_kwargs", "attention_mask",
                        "encoder_attention_mask"})
    ATTENTION_KWARGS = "cross_attention_kwargs"

    def prelude(self, model):
        return ["pos_embed", self.PRELUDE]

    def tail(self, model):
        return ["norm_out", "scale_shift_table", "proj_out"]  # the output modulation and projection

    def required(self, model):
        return ("encoder_hidden_states",) + (("added_cond_kwargs",) if model.use_additional_conditions else ())

    def probe(self, model):
        problems = missing_attributes(model, ("pos_embed", "adaln_single", "caption_projection",
                                              "use_additional_conditions", "transformer_blocks"))
        if not problems and len(model.transformer_blocks):
            problems += missing_parameters(model.transformer_blocks[0].forward, "transformer_blocks.0.forward",
                                           ("encoder_hidden_states", "encoder_attention_mask", "timestep",
                                            "cross_attention_kwargs"))
        return problems

    def run(self, model, sample, timestep, keep, stop, encoder_hidden_states=None, added_cond_kwargs=None,
            cross_attention_kwargs=None, attention_mask=None, encoder_attention_mask=None):
        c = FeatureCollector(keep, stop)
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


register_adapter("diffusers.DiTTransformer2DModel", DiTAdapter)
register_adapter("diffusers.PixArtTransformer2DModel", PixArtAdapter)
