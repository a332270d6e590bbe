"""The images to fine-tune on and their captions: a folder in the Hugging Face imagefolder layout
(metadata.jsonl lines with `file_name` and `text`) or a `datasets` dataset saved with save_to_disk
(columns `image` and `text`); each image resized (shorter side) and cropped to a square in [-1, 1]."""
from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ...errors import InputError, MissingFileError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


@dataclass
class CaptionedImages:
    """What was found: each readable image (a path, or a PIL image from a dataset) with its caption."""
    images: list
    captions: list[str]
    source: str
    skipped: list[str] = field(default_factory=list)  # unreadable images, named

    def __len__(self) -> int:
        return len(self.images)


def load(data: str | Path, unconditional: bool = False, strict: bool = False) -> CaptionedImages:
    """The captioned images under `data`. Images without a caption are an error unless `unconditional`
    (every caption is then the empty prompt); an image that cannot be read is skipped and counted
    (an error with `strict`)."""
    path = Path(data)
    if not path.exists():
        raise MissingFileError(f"data: {path} does not exist; expected a folder of images with metadata.jsonl or a "
                               "datasets dataset saved with save_to_disk")
    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file():
        found = _from_saved_dataset(path, unconditional)
    elif path.is_dir():
        found = _from_image_folder(path, unconditional)
    else:
        raise InputError(f"data: {path} is a file; expected a folder of images with metadata.jsonl or a datasets "
                         "dataset saved with save_to_disk")
    found = _readable(found, strict)
    if not len(found):
        raise InputError(f"data: no readable image in {path}" + (f" ({len(found.skipped)} could not be read)"
                                                                 if found.skipped else ""))
    return found


def _caption(value, where: str, unconditional: bool) -> str:
    if unconditional:
        return ""
    if not isinstance(value, str) or not value.strip():
        raise InputError(f"data: {where} has no caption (a non-empty `text`); caption every image, or pass "
                         "--unconditional to train on the empty prompt")
    return value


def _from_image_folder(folder: Path, unconditional: bool) -> CaptionedImages:
    meta = folder / "metadata.jsonl"
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
    if not meta.is_file():
        if not unconditional:
            raise InputError(f"data: {folder} has no metadata.jsonl (one JSON line per image: file_name, text); "
                             "add the captions, or pass --unconditional")
        return CaptionedImages(files, [""] * len(files), str(folder))
    captions: dict[str, str] = {}
    for n, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            name = row["file_name"]
        except (ValueError, KeyError, TypeError):
            raise InputError(f"data: {meta} line {n} is not a JSON object with file_name and text: {line[:80]!r}") \
                from None
        captions[str(Path(name))] = _caption(row.get("text"), f"{meta} line {n} ({name})", unconditional)
    missing = [str(p.relative_to(folder)) for p in files if str(p.relative_to(folder)) not in captions]
    if missing and not unconditional:
        raise InputError(f"data: {len(missing)} images in {folder} have no line in metadata.jsonl (e.g. "
                         f"{missing[0]}); caption every image, or pass --unconditional")
    listed = [folder / name for name in captions]
    return CaptionedImages(listed, [captions[name] for name in captions], str(folder))


def _from_saved_dataset(folder: Path, unconditional: bool) -> CaptionedImages:
    try:
        import datasets
    except ImportError:
        raise InputError(f"data: {folder} is a datasets dataset; install the finetune extra "
                         "(pip install 'fastperc[finetune]') to read it") from None
    ds = datasets.load_from_disk(str(folder))
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise InputError(f"data: {folder} holds the splits {list(ds)}; expected a 'train' split or one dataset")
        ds = ds["train"]
    if "image" not in ds.column_names:
        raise InputError(f"data: the dataset in {folder} has the columns {ds.column_names}; expected `image` (and "
                         "`text`)")
    if "text" not in ds.column_names and not unconditional:
        raise InputError(f"data: the dataset in {folder} has no `text` column (columns: {ds.column_names}); add "
                         "captions, or pass --unconditional")
    texts = ds["text"] if "text" in ds.column_names else [""] * len(ds)
    captions = [_caption(t, f"row {i} of {folder}", unconditional) for i, t in enumerate(texts)]
    return CaptionedImages(list(ds["image"]), captions, str(folder))


def _readable(found: CaptionedImages, strict: bool) -> CaptionedImages:
    from PIL import Image
    keep_images, keep_captions, skipped = [], [], []
    for image, caption in zip(found.images, found.captions):
        try:
            if isinstance(image, (str, Path)):
                with Image.open(image) as im:
                    im.verify()  # reads the whole file: a truncated or corrupt image fails here, not mid-run
        except Exception as exc:  # PIL raises many types for a bad file
            if strict:
                raise InputError(f"data: {image} cannot be read ({type(exc).__name__}: {exc}); remove it, or drop "
                                 "--strict to skip unreadable images") from None
            skipped.append(str(image))
            continue
        keep_images.append(image)
        keep_captions.append(caption)
    if skipped:
        warnings.warn(f"data: skipped {len(skipped)} image(s) that cannot be read, e.g. {skipped[0]}", stacklevel=3)
    return CaptionedImages(keep_images, keep_captions, found.source, skipped)


def crop_geometry(image, resolution: int, crop: tuple[float, float] = (0.5, 0.5),
                  flip: bool = False) -> tuple[tuple[int, int], int, int]:
    """((original height, width), top, left) of the square `prepared` cuts: its corner in the resized
    image, mirrored with `flip` (what SDXL's size conditioning takes)."""
    from PIL import Image
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            w, h = im.size
    else:
        w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    left = round((size[0] - resolution) * crop[0])
    top = round((size[1] - resolution) * crop[1])
    return (h, w), top, (size[0] - resolution - left) if flip else left


def prepared(image, resolution: int, crop: tuple[float, float] = (0.5, 0.5), flip: bool = False) -> torch.Tensor:
    """One image as a (3, resolution, resolution) tensor in [-1, 1]: RGB, the shorter side resized to
    `resolution` (bicubic), a square cropped at `crop` (relative position of its corner: (0.5, 0.5) is
    the centre), mirrored left-right with `flip`."""
    from PIL import Image
    im = Image.open(image) if isinstance(image, (str, Path)) else image
    im = im.convert("RGB")
    w, h = im.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    im = im.resize(size, Image.Resampling.BICUBIC)
    left = round((size[0] - resolution) * crop[0])
    top = round((size[1] - resolution) * crop[1])
    im = im.crop((left, top, left + resolution, top + resolution))
    if flip:
        im = im.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()
