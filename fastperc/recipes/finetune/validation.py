"""Validation images during a fine-tune: each prompt sampled with the pipeline's own sampler from fixed
seeds, without guidance and (if asked) at a classifier-free guidance scale, written as one PNG grid per
step (a row per prompt, a column per guidance setting)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


@torch.no_grad()
def grid(pipe, family, model, prompts: list[str], resolution: int, steps: int, cfg_scale: float, guidance: float,
         seed: int, device: torch.device) -> np.ndarray:
    """(rows * resolution, cols * resolution, 3) uint8: prompts by rows, no guidance then `cfg_scale`
    (when > 1) by columns; every image from the same seed. `model` is the family's denoiser with the
    weights to show; `guidance` Flux's distilled guidance value (families.Family.sampler_options)."""
    sampler = type(pipe).from_pipe(pipe, **{family.denoiser: model})  # the same parts, this denoiser
    sampler.set_progress_bar_config(disable=True)
    scales = [1.0] + ([cfg_scale] if cfg_scale > 1 else [])
    was_training = model.training
    model.eval()
    rows = []
    try:
        for prompt in prompts:
            row = []
            for scale in scales:
                g = torch.Generator(device=device).manual_seed(seed)
                out = sampler(prompt, height=resolution, width=resolution, num_inference_steps=steps,
                              generator=g, output_type="np", **family.sampler_options(scale, guidance))
                row.append(out.images[0])
            rows.append(np.concatenate(row, axis=1))
    finally:
        model.train(was_training)
    return (np.clip(np.concatenate(rows, axis=0), 0, 1) * 255).round().astype(np.uint8)


def write(image: np.ndarray, folder: Path, step: int) -> Path:
    from PIL import Image
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"step_{step:07d}.png"
    Image.fromarray(image).save(path)
    return path
