"""What the fine-tune reads each step, encoded once: the latents of each image (its centre crop and its
mirror image: one VAE posterior draw each) and its caption's text-encoder states, with the empty
prompt's for caption dropout; kept under OUT/cache and reused while the pipeline, data and resolution
are the same (a resumed run encodes nothing). With random crops the images are encoded per step instead
and only the captions are cached."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import captioned_images, pipeline


@dataclass
class Encoded:
    latents: torch.Tensor | None  # (N, 2, C, h, w): centre crop, mirrored; None with random crops
    prompts: torch.Tensor         # (N, tokens, width): each image's caption
    empty: torch.Tensor           # (tokens, width): the empty prompt (caption dropout)


def _stamp(path: Path) -> list:
    """A file's identity for the cache: its path, size and modification time (an edit re-encodes)."""
    st = path.stat()
    return [str(path), st.st_size, st.st_mtime_ns]


def _key(pretrained: str, found: captioned_images.CaptionedImages, resolution: int, random_crop: bool,
         seed: int) -> str:
    """What the encoding depends on: the pipeline's text encoders, tokenizers and VAE (their files), the
    images (files, or a dataset's image sizes), the captions, the resolution, the crops and the seed."""
    root = Path(pretrained).resolve()
    parts = sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).parts[0].startswith(
        ("text_encoder", "tokenizer", "vae")))
    h = hashlib.sha256()
    h.update(json.dumps([[_stamp(p) for p in parts], found.source, resolution, random_crop, seed, found.captions,
                         [_stamp(Path(i)) if isinstance(i, (str, Path)) else list(i.size) for i in found.images]]
                        ).encode())
    return h.hexdigest()


def encoded(pipe, pretrained: str, found: captioned_images.CaptionedImages, resolution: int, random_crop: bool,
            cache: Path, device: torch.device, seed: int, is_main: bool = True, batch: int = 16) -> Encoded:
    """The cached encoding for these inputs, made now if the cache holds another (or none). One process
    (`is_main`) writes it; the others must wait for it (the caller's barrier) and then read it."""
    key = _key(pretrained, found, resolution, random_crop, seed)
    file = cache / "encoded.pt"
    if file.is_file():
        held = torch.load(file, map_location="cpu", weights_only=True)
        if held.get("key") == key:
            return Encoded(held["latents"], held["prompts"], held["empty"])
    if not is_main:
        raise RuntimeError(f"{file} is not ready: the main process encodes it first")
    prompts = pipeline.encode_prompts(pipe, found.captions, device).half()
    empty = pipeline.encode_prompts(pipe, [""], device)[0].half()
    latents = None
    if not random_crop:
        g = torch.Generator(device=device).manual_seed(seed)
        chunks = []
        for i in range(0, len(found), batch):
            images = [captioned_images.prepared(im, resolution, flip=flip) for im in found.images[i:i + batch]
                      for flip in (False, True)]
            z = pipeline.encode_images(pipe, torch.stack(images), g).float().cpu()
            chunks.append(z.view(-1, 2, *z.shape[1:]).half())
        latents = torch.cat(chunks)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = file.with_suffix(".tmp")
    torch.save({"key": key, "latents": latents, "prompts": prompts, "empty": empty}, tmp)
    os.replace(tmp, file)
    return Encoded(latents, prompts, empty)


def random_crops(pipe, found: captioned_images.CaptionedImages, rows: list[int], resolution: int,
                 draws: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """Latents of a random crop of each image in `rows`, encoded now: `draws` (rows, 3) in [0, 1) place
    the crop and flip it (third < 0.5), `eps` is the VAE posterior's standard normal draw."""
    images = [captioned_images.prepared(found.images[r], resolution, crop=(a, b), flip=c < 0.5)
              for r, (a, b, c) in zip(rows, draws.tolist())]
    return pipeline.encode_images(pipe, torch.stack(images), eps=eps).float()
