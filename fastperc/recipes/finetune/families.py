"""What differs between the pipeline families `fastperc finetune` takes: how a caption becomes the
UNet's conditioning (each family's own `encode_prompt`), and what else the UNet gets. One entry per
family; the loop, the cache and the teacher see only a dict of per-sample tensors.

    Stable Diffusion 1.x / 2.x   encoder_hidden_states (CLIP)
    Stable Diffusion XL          encoder_hidden_states (two CLIP encoders), and added_cond_kwargs:
                                 text_embeds (the pooled projection) and time_ids (original size, crop
                                 corner, target size: the micro-conditioning SDXL was trained with)
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Family:
    pipeline: str   # model_index.json's _class_name
    label: str
    _encode: Callable  # (pipe, prompts, device) -> dict of (N, ...) tensors
    sizes: bool = False  # the UNet takes SDXL's time ids (image size and crop)

    @torch.no_grad()
    def encode(self, pipe, prompts: list[str], device: torch.device, batch: int = 64) -> dict[str, torch.Tensor]:
        """Each prompt's conditioning, as the pipeline makes it, in batches; float32 on the CPU."""
        parts = [self._encode(pipe, prompts[i:i + batch], device) for i in range(0, len(prompts), batch)]
        return {k: torch.cat([p[k].float().cpu() for p in parts]) for k in parts[0]}

    def unet_kwargs(self, cond: dict[str, torch.Tensor], time_ids: torch.Tensor | None) -> dict:
        """The UNet's (and the teacher's) keyword arguments for a micro-batch."""
        if not self.sizes:
            return {"encoder_hidden_states": cond["encoder_hidden_states"]}
        return {"encoder_hidden_states": cond["encoder_hidden_states"],
                "added_cond_kwargs": {"text_embeds": cond["text_embeds"], "time_ids": time_ids}}


def _sd(pipe, prompts, device):
    embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
    return {"encoder_hidden_states": embeds}


def _sdxl(pipe, prompts, device):
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    return {"encoder_hidden_states": embeds, "text_embeds": pooled}


FAMILIES = {f.pipeline: f for f in (
    Family("StableDiffusionPipeline", "Stable Diffusion 1.x / 2.x", _sd),
    Family("StableDiffusionXLPipeline", "Stable Diffusion XL", _sdxl, sizes=True),
)}


def time_ids(original: tuple[int, int], top: int, left: int, resolution: int) -> list[float]:
    """SDXL's micro-conditioning of one crop: original (height, width), the crop's top-left corner in the
    resized image, the target size."""
    return [float(original[0]), float(original[1]), float(top), float(left), float(resolution), float(resolution)]
