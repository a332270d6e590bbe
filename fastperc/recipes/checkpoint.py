"""Atomic checkpoints: write to a temporary file in the same folder, fsync it, move the current file
aside as `<name>.prev<suffix>` (the last good one is always kept), rename the new one over the
target and fsync the folder, so a crash, a signal or `kill -9` never leaves a half-written checkpoint
and never loses the last complete one."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from ..errors import InputError, MissingFileError

FORMAT = "fastperc-checkpoint-v1"


def previous(path: str | os.PathLike) -> Path:
    """Where `save` keeps the checkpoint that `path` held before the latest save."""
    path = Path(path)
    return path.with_name(f"{path.stem}.prev{path.suffix}")


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not supported (e.g. some network file systems): the renames are still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(obj: dict, path: str | os.PathLike, keep_previous: bool = True) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({"format": FORMAT, **obj}, f)
            f.flush()
            os.fsync(f.fileno())
        if keep_previous and path.exists():
            # A hard link keeps `path` in place throughout: at every instant a complete checkpoint exists.
            prev_tmp = path.with_name(f".{path.name}.prev.tmp")
            prev_tmp.unlink(missing_ok=True)
            try:
                os.link(path, prev_tmp)
            except OSError:
                shutil.copy2(path, prev_tmp)
            os.replace(prev_tmp, previous(path))
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """Load a fastperc checkpoint; a missing, truncated or foreign file is a clear ValueError naming it
    (and the previous checkpoint kept beside it, when there is one)."""
    path = Path(path)
    if path.is_dir():
        path = path / "checkpoint.pt"
    if not path.exists():
        raise MissingFileError(f"checkpoint: {path} does not exist")
    prev = previous(path)
    hint = f"; the previous checkpoint is kept as {prev}" if prev.exists() else ""
    try:
        obj = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:  # torch raises several types for truncated/corrupt files
        raise InputError(f"checkpoint: {path} is not a readable checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}){hint}") from e
    if not isinstance(obj, dict) or obj.get("format") != FORMAT:
        raise InputError(f"checkpoint: {path} is not a {FORMAT} file{hint}")
    return obj
