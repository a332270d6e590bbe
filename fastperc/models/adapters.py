"""The adapters of fastperc's own demo models, registered here so that the library core imports no
demo model: both run their `features` method, which stops after any stage."""
from __future__ import annotations

from ..adapters import Adapter, register_adapter
from .dit import DiT
from .unet import UNet


class FastpercUNetAdapter(Adapter):
    """fastperc's UNet: embeddings, conv_in, down blocks, midblock, up blocks (any stage can be tapped)."""

    def stages(self, model: UNet) -> list[str]:
        return model.stage_names()

    def supports(self, kwargs):
        return set(kwargs) <= {"class_labels"}

    def embeddings(self, model):
        return ["time_embedding", "class_embedding"]

    def unused(self, model, stop):
        # The time and class embeddings are two stages but computed together, before either is checked.
        return [n for n in super().unused(model, stop) if n != "class_embedding"]

    def run(self, model, sample, timestep, keep, stop, **kwargs):
        return model.features(sample, timestep, kwargs.get("class_labels"), keep=keep, stop=stop)[0]


class FastpercDiTAdapter(Adapter):
    """fastperc's DiT: the patch/time/class embeddings, then blocks up to the deepest tap (the final
    norm and unpatchify are cut). Timestep: as given (DDPM index or flow timestep sigma * T)."""

    def stages(self, model: DiT) -> list[str]:
        return model.stage_names()[:-1]

    def tail(self, model: DiT) -> list[str]:
        return model.stage_names()[-1].split("|")  # the output head (norm_out, adaLN_out, proj_out)

    def blocks(self, model: DiT) -> list[str]:
        return [f"blocks.{i}" for i in range(len(model.blocks))]

    def supports(self, kwargs):
        return set(kwargs) <= {"class_labels"}

    def run(self, model, sample, timestep, keep, stop, **kwargs):
        return model.features(sample, timestep, kwargs.get("class_labels"), keep=keep, stop=stop)[0]


register_adapter(UNet, FastpercUNetAdapter)
register_adapter(DiT, FastpercDiTAdapter)
