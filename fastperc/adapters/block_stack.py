"""What the transformer families share: a block stack after a prelude of embeddings, and which
attention kwargs the blocks take as they are."""
from __future__ import annotations

from abc import abstractmethod

from .base import Adapter


def plain_attention_kwargs(attention_kwargs) -> bool:
    """Attention kwargs the blocks take as they are. A LoRA `scale` (applied by the model's forward
    decorator) and IP-Adapter embeddings (projected by the forward) need the full forward: hook path."""
    return attention_kwargs is None or not {"scale", "ip_adapter_image_embeds"} & set(attention_kwargs)


class BlockStack(Adapter):
    """A transformer: prelude stages (patch and condition embeddings), then its blocks one stage each."""

    KWARGS: frozenset[str] = frozenset()
    ATTENTION_KWARGS = "joint_attention_kwargs"

    @abstractmethod
    def prelude(self, model) -> list[str]:
        """The stages before the first block (patch, time and text embeddings)."""

    def embeddings(self, model):
        return self.prelude(model)

    def blocks(self, model):
        return [f"transformer_blocks.{i}" for i in range(len(model.transformer_blocks))]

    def stages(self, model):
        return self.prelude(model) + self.blocks(model)

    def supports(self, kwargs):
        return set(kwargs) <= self.KWARGS and plain_attention_kwargs(kwargs.get(self.ATTENTION_KWARGS))
