"""LoRA fine-tuning (`--lora-rank R`): adapters on the denoiser's attention projections through peft, as
diffusers' LoRA scripts add them (`add_adapter`); only they train. The teacher is the same denoiser with its
adapters off (`FrozenTeacher(..., copy=False, adapters_off=True)`): no second copy of the weights. The
EMA, when kept, covers the LoRA weights only; the result is saved the way diffusers loads LoRA weights
(`pipe.load_lora_weights(OUT/final)`)."""
from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import torch
from torch import nn

from ..objective import ema_tensors_update

def add_lora(model: nn.Module, rank: int, targets: tuple[str, ...], seed: int) -> list[nn.Parameter]:
    """LoRA of `rank` on the modules of `model` whose names end in one of `targets` (its own weights
    frozen); the LoRA parameters, in the model's order. The initial weights come from `seed` (the global
    RNG is left as it was): every run with the seed starts alike, whatever the number of processes."""
    from peft import LoraConfig
    model.requires_grad_(False)
    device = next(model.parameters()).device
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        model.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                     target_modules=list(targets)))
    return [p for p in model.parameters() if p.requires_grad]


def trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


class LoraEMA(nn.Module):
    """The EMA of the LoRA weights (a shadow per trainable tensor); saved with accelerate's state."""

    def __init__(self, params: list[nn.Parameter]):
        super().__init__()
        self.shadow = nn.ParameterList([nn.Parameter(p.detach().clone(), requires_grad=False) for p in params])

    def update(self, params: list[nn.Parameter], decay: float, apply: torch.Tensor | None = None) -> None:
        ema_tensors_update(list(self.shadow), list(params), decay, apply)

    @contextlib.contextmanager
    def swapped_in(self, params: list[nn.Parameter]):
        """The EMA values in `params` for the span of the block (validation), the trained ones after."""
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, s in zip(params, self.shadow):
                p.copy_(s)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)


def save(pipe, model: nn.Module, out: Path, part: str = "unet") -> Path:
    """The LoRA weights of the pipeline's `part` ("unet" or "transformer") as diffusers writes and loads
    them (pytorch_lora_weights.safetensors), written beside `out` and renamed into place."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    layers = get_peft_model_state_dict(model)
    if part == "unet":  # diffusers' UNet LoRA files use its own key names; transformers' keep peft's
        layers = convert_state_dict_to_diffusers(layers)
    type(pipe).save_lora_weights(save_directory=str(tmp), safe_serialization=True, **{f"{part}_lora_layers": layers})
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
