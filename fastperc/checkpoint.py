"""Atomic checkpoints: write to a temporary file in the same folder, fsync, then rename over the target,
so a crash or a signal never leaves a half-written checkpoint behind."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch

FORMAT = "fastperc-checkpoint-v1"


def save(obj: dict, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **obj}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a fastperc checkpoint; a missing, truncated or foreign file is a clear ValueError."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.exists():
        raise ValueError(f"checkpoint: {path} does not exist")
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises several types for truncated/corrupt files
        raise ValueError(f"checkpoint: {path} is not a readable checkpoint ({type(e).__name__}: {e})") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise ValueError(f"checkpoint: {path} is not a {FORMAT} file")
    return obj
