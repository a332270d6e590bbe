"""What differs between the pipeline families `fastperc finetune` takes: which component is the denoiser,
how a caption becomes its conditioning (each family's own `encode_prompt`), what else it gets, and in
what layout it sees the latents. One entry per family; the loop, the cache and the teacher see only a
dict of per-sample tensors and these few methods.

    Stable Diffusion 1.x / 2.x   UNet: encoder_hidden_states (CLIP)
    Stable Diffusion XL          UNet: encoder_hidden_states (two CLIP encoders), and added_cond_kwargs:
                                 text_embeds (the pooled projection) and time_ids (original size, crop
                                 corner, target size: the micro-conditioning SDXL was trained with)
    Stable Diffusion 3 / 3.5     transformer: encoder_hidden_states (two CLIP encoders and T5, joined),
                                 pooled_projections (both CLIP encoders' pooled outputs); flow matching
    Flux                         transformer on packed latents (2x2 patches as tokens): encoder_hidden_states
                                 (T5), pooled_projections (CLIP), img_ids / txt_ids (the rotary positions)
                                 and, for guidance-distilled models (FLUX.1-dev), the guidance value;
                                 flow matching
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

# The attention projections LoRA adapts: the image stream's (every family) and, in the joint text-image
# blocks of SD3 and Flux, the text stream's, as diffusers' SD3 and Flux LoRA scripts adapt them.
IMAGE_ATTENTION = ("to_k", "to_q", "to_v", "to_out.0")
JOINT_ATTENTION = IMAGE_ATTENTION + ("add_k_proj", "add_q_proj", "add_v_proj", "to_add_out")


@dataclass(frozen=True)
class Family:
    pipeline: str   # model_index.json's _class_name
    label: str
    _encode: Callable  # (pipe, prompts, device) -> dict of (N, ...) tensors
    denoiser: str = "unet"  # the pipeline component that trains (and is the teacher)
    sizes: bool = False     # the UNet takes SDXL's time ids (image size and crop)
    packed: bool = False    # Flux: 2x2 latent patches as tokens, with position ids and a guidance value
    lora_targets: tuple[str, ...] = IMAGE_ATTENTION
    t_density: str = "uniform"  # how diffusers' training scripts for the family draw t (--t-density's default)

    @torch.no_grad()
    def encode(self, pipe, prompts: list[str], device: torch.device, batch: int = 64) -> dict[str, torch.Tensor]:
        """Each prompt's conditioning, as the pipeline makes it, in batches; float32 on the CPU."""
        parts = [self._encode(pipe, prompts[i:i + batch], device) for i in range(0, len(prompts), batch)]
        return {k: torch.cat([p[k].float().cpu() for p in parts]) for k in parts[0]}

    def model_input(self, pipe, latents: torch.Tensor) -> torch.Tensor:
        """Latents (B, C, h, w) in the layout the denoiser takes: as they are, or Flux's packed tokens
        (B, h/2 * w/2, 4C). The loss compares in this layout too (as diffusers' Flux script does)."""
        if not self.packed:
            return latents
        B, C, h, w = latents.shape
        return type(pipe)._pack_latents(latents, B, C, h, w)

    def fixed_inputs(self, pipe, side: int, text_tokens: int, device: torch.device) -> dict[str, torch.Tensor]:
        """What the denoiser gets that is the same every step, made once on `device` (no per-step host
        copy): Flux's rotary position ids of the text tokens and of the packed latents of `side`."""
        if not self.packed:
            return {}
        return {"txt_ids": torch.zeros(text_tokens, 3, device=device),
                "img_ids": type(pipe)._prepare_latent_image_ids(1, side // 2, side // 2, device, torch.float32)}

    def kwargs(self, pipe, cond: dict[str, torch.Tensor], time_ids: torch.Tensor | None,
               fixed: dict[str, torch.Tensor], guidance: float) -> dict:
        """The denoiser's (and the teacher's) keyword arguments for a micro-batch: `cond` the captions'
        conditioning, `time_ids` SDXL's size conditioning, `fixed` the `fixed_inputs`, `guidance` Flux's
        guidance value (given to guidance-distilled models only)."""
        if self.sizes:
            return {"encoder_hidden_states": cond["encoder_hidden_states"],
                    "added_cond_kwargs": {"text_embeds": cond["text_embeds"], "time_ids": time_ids}}
        out = dict(cond, **fixed)
        if self.packed and getattr(pipe.transformer.config, "guidance_embeds", False):
            embeds = cond["encoder_hidden_states"]
            out["guidance"] = torch.full((embeds.shape[0],), float(guidance), device=embeds.device)
        return out

    def sampler_options(self, scale: float, guidance: float) -> dict:
        """The pipeline call's guidance options for a validation image: classifier-free guidance at
        `scale` (1: none). Flux's `guidance_scale` is the distilled guidance value it was trained with;
        its classifier-free guidance is `true_cfg_scale` against the empty prompt."""
        if not self.packed:
            return {"guidance_scale": scale}
        options = {"guidance_scale": guidance}
        if scale > 1:
            options.update(true_cfg_scale=scale, negative_prompt="")
        return options


def _sd(pipe, prompts, device):
    embeds, _ = pipe.encode_prompt(prompts, device, 1, False)
    return {"encoder_hidden_states": embeds}


def _sdxl(pipe, prompts, device):
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    return {"encoder_hidden_states": embeds, "text_embeds": pooled}


def _sd3(pipe, prompts, device):
    embeds, _, pooled, _ = pipe.encode_prompt(prompts, None, None, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


def _flux(pipe, prompts, device):
    embeds, pooled, _ = pipe.encode_prompt(prompts, None, device=device, num_images_per_prompt=1)
    return {"encoder_hidden_states": embeds, "pooled_projections": pooled}


FAMILIES = {f.pipeline: f for f in (
    Family("StableDiffusionPipeline", "Stable Diffusion 1.x / 2.x", _sd),
    Family("StableDiffusionXLPipeline", "Stable Diffusion XL", _sdxl, sizes=True),
    Family("StableDiffusion3Pipeline", "Stable Diffusion 3 / 3.5", _sd3, denoiser="transformer",
           lora_targets=JOINT_ATTENTION, t_density="logit_normal"),
    Family("FluxPipeline", "Flux", _flux, denoiser="transformer", packed=True, lora_targets=JOINT_ATTENTION),
)}


def time_ids(original: tuple[int, int], top: int, left: int, resolution: int) -> list[float]:
    """SDXL's micro-conditioning of one crop: original (height, width), the crop's top-left corner in the
    resized image, the target size."""
    return [float(original[0]), float(original[1]), float(top), float(left), float(resolution), float(resolution)]
