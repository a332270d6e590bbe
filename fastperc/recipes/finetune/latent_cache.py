"""What the fine-tune reads each step, encoded once: the latents of each image (its centre crop and its
mirror image: one VAE posterior draw each), its caption's conditioning (the family's encode_prompt), with
the empty prompt's for caption dropout, and for SDXL each crop's size conditioning; kept under OUT/cache and reused while the pipeline, data and resolution
are the same (a resumed run encodes nothing). With random crops the images are encoded per step instead
and only the captions are cached."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from . import captioned_images, families, pipeline


@dataclass
class Encoded:
    latents: torch.Tensor | None          # (N, 2, C, h, w): centre crop, mirrored; None with random crops
    prompts: dict[str, torch.Tensor]      # each image's caption: name -> (N, ...) (encoder_hidden_states, ...)
    empty: dict[str, torch.Tensor]        # the empty prompt's (caption dropout): name -> (...)
    time_ids: torch.Tensor | None = None  # SDXL: (N, 2, 6) for the centre crop and its mirror

    def to(self, store: torch.device, device: torch.device) -> "Encoded":
        """The per-image tensors on `store`, the empty prompt's on `device`."""
        move = lambda t: None if t is None else t.to(store)  # noqa: E731
        return Encoded(move(self.latents), {k: v.to(store) for k, v in self.prompts.items()},
                       {k: v.to(device) for k, v in self.empty.items()}, move(self.time_ids))

    def nbytes(self) -> int:
        tensors = [self.latents, self.time_ids, *self.prompts.values()]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)


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


def encoded(pipe, family: families.Family, pretrained: str, found: captioned_images.CaptionedImages,
            resolution: int, random_crop: bool, cache: Path, device: torch.device, seed: int, is_main: bool = True,
            batch: int = 16) -> Encoded:
    """The cached encoding for these inputs, made now if the cache holds another (or none). One process
    (`is_main`) writes it; the others must wait for it (the caller's barrier) and then read it."""
    key = _key(pretrained, found, resolution, random_crop, seed)
    file = cache / "encoded.pt"
    if file.is_file():
        held = torch.load(file, map_location="cpu", weights_only=True)
        if held.get("key") == key:
            return Encoded(held["latents"], held["prompts"], held["empty"], held.get("time_ids"))
    if not is_main:
        raise RuntimeError(f"{file} is not ready: the main process encodes it first")
    prompts = {k: v.half() for k, v in family.encode(pipe, found.captions, device).items()}
    empty = {k: v[0].half() for k, v in family.encode(pipe, [""], device).items()}
    latents = time_ids = None
    if family.sizes and not random_crop:
        time_ids = torch.tensor([[families.time_ids(*captioned_images.crop_geometry(im, resolution, flip=flip),
                                                    resolution) for flip in (False, True)] for im in found.images])
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
    torch.save({"key": key, "latents": latents, "prompts": prompts, "empty": empty, "time_ids": time_ids}, tmp)
    os.replace(tmp, file)
    return Encoded(latents, prompts, empty, time_ids)


def random_crops(pipe, found: captioned_images.CaptionedImages, rows: list[int], resolution: int,
                 draws: torch.Tensor, eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents, SDXL time ids (rows, 6)) of a random crop of each image in `rows`, encoded now: `draws`
    (rows, 3) in [0, 1) place the crop (left, top) and flip it (third < 0.5), `eps` is the VAE
    posterior's standard normal draw."""
    crops = [((a, b), c < 0.5) for a, b, c in draws.tolist()]
    images = [captioned_images.prepared(found.images[r], resolution, crop=crop, flip=flip)
              for r, (crop, flip) in zip(rows, crops)]
    ids = [families.time_ids(*captioned_images.crop_geometry(found.images[r], resolution, crop, flip), resolution)
           for r, (crop, flip) in zip(rows, crops)]
    return pipeline.encode_images(pipe, torch.stack(images), eps=eps).float(), torch.tensor(ids, device=eps.device)
