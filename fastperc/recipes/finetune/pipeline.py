"""The pipeline folder being fine-tuned: which family it is, loading its parts with local files only,
encoding captions and images with its own text encoder and VAE, and writing the fine-tuned pipeline."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ...errors import InputError, MissingFileError
from .families import FAMILIES, Family


def pipeline_family(folder: str | Path) -> Family:
    """The family of the pipeline a folder holds (model_index.json's _class_name); a clear error when the
    folder is not a diffusers pipeline or holds a family fastperc does not fine-tune yet."""
    folder = Path(folder)
    if not folder.is_dir():
        raise MissingFileError(f"pretrained: {folder} is not a folder; expected a diffusers pipeline folder (with "
                               "model_index.json), e.g. one written by DiffusionPipeline.save_pretrained")
    index = folder / "model_index.json"
    if not index.is_file():
        raise InputError(f"pretrained: {folder} is not a diffusers pipeline folder (no model_index.json); expected "
                         "a folder written by DiffusionPipeline.save_pretrained or downloaded from the hub")
    try:
        name = json.loads(index.read_text())["_class_name"]
    except (ValueError, KeyError) as exc:
        raise InputError(f"pretrained: {index} is not a diffusers model index (no _class_name): {exc}") from None
    if name not in FAMILIES:
        raise InputError(f"pretrained: {folder} holds a {name}; fastperc finetune supports "
                         + ", ".join(f"{k} ({f.label})" for k, f in FAMILIES.items()))
    return FAMILIES[name]


def load(folder: str | Path, device: torch.device, progress: bool = True) -> tuple[object, Family]:
    """(the pipeline, its family), loaded with local files only (Stable Diffusion's without its safety
    checker: fine-tuning never runs it, and the written pipeline keeps the original's). Every part but
    the denoiser (text encoders, VAE) frozen on `device`; the denoiser (UNet or transformer) as saved."""
    import diffusers
    import transformers
    family = pipeline_family(folder)
    if not progress:
        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    extra = {"safety_checker": None, "requires_safety_checker": False} if family.pipeline == \
        "StableDiffusionPipeline" else {}
    pipe = diffusers.DiffusionPipeline.from_pretrained(str(folder), local_files_only=True, **extra)
    pipe.set_progress_bar_config(disable=True)
    for name, part in pipe.components.items():
        if isinstance(part, torch.nn.Module) and name != family.denoiser:
            part.to(device).eval().requires_grad_(False)
    denoiser(pipe, family).to(device)
    return pipe, family


def denoiser(pipe, family: Family) -> torch.nn.Module:
    """The pipeline's part that trains: its UNet or its transformer."""
    return getattr(pipe, family.denoiser)


def resolution_step(pipe, family: Family) -> int:
    """What an image side must be a multiple of: the VAE's downsampling times the denoiser's (a UNet: 2 per
    level below the first; a transformer: its patch size, 2 for Flux's packing)."""
    model = denoiser(pipe, family)
    if family.denoiser == "unet":
        return pipe.vae_scale_factor * 2 ** (len(model.config.block_out_channels) - 1)
    return pipe.vae_scale_factor * (2 if family.packed else model.config.patch_size)


def largest_resolution(pipe, family: Family) -> int | None:
    """The largest side the denoiser's position embedding covers (SD3's `pos_embed_max_size` patches),
    or None when there is no such limit."""
    limit = getattr(denoiser(pipe, family).config, "pos_embed_max_size", None)
    return None if limit is None else limit * resolution_step(pipe, family)


def check_resolution(pipe, family: Family, resolution: int) -> None:
    step = resolution_step(pipe, family)
    kind = "UNet" if family.denoiser == "unet" else "transformer"
    if resolution % step:
        lower, upper = max(step, resolution // step * step), (resolution // step + 1) * step
        raise InputError(f"resolution: this pipeline's VAE and {kind} take sides that are multiples of {step}, got "
                         f"{resolution} (use {lower} or {upper})")
    largest = largest_resolution(pipe, family)
    if largest is not None and resolution > largest:
        raise InputError(f"resolution: this pipeline's transformer takes sides up to {largest} (its position "
                         f"embedding's size), got {resolution}")


@torch.no_grad()
def encode_images(pipe, images: torch.Tensor, generator: torch.Generator | None = None,
                  eps: torch.Tensor | None = None) -> torch.Tensor:
    """Latents of images in [-1, 1] (B, 3, H, W): a draw from the VAE's posterior (mean + std * eps, eps
    given or drawn from `generator`), shifted and scaled as the UNet was trained."""
    vae = pipe.vae
    posterior = vae.encode(images.to(vae.device, vae.dtype)).latent_dist
    if eps is None:
        eps = torch.randn(posterior.mean.shape, generator=generator, device=posterior.mean.device)
    latents = posterior.mean + posterior.std * eps.to(posterior.mean.dtype)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def write_pipeline(source: str | Path, model, out: Path, part: str = "unet") -> Path:
    """A complete pipeline folder at `out`: every part of `source` as it was (tokenizers, text encoders,
    VAE, scheduler, safety checker, ...) and the fine-tuned denoiser `model` as its `part` ("unet" or
    "transformer"). Written beside and renamed into place, so an interrupted write leaves no half
    pipeline."""
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    shutil.copytree(source, tmp, ignore=lambda d, names: [part] if Path(d) == Path(source) else [])
    model.save_pretrained(tmp / part)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    return out
