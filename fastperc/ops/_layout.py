"""Memory-layout rule shared by the fused backends and their fake (meta) kernels.

Kernels read each tensor as a flat (B, N) buffer. That is valid when sample b is one dense block
(batch-major dense) and all tensors of one call order their elements the same way, i.e. have equal
strides on every dimension of size > 1. Strides of size-1 dimensions are arbitrary in torch (a
`.contiguous()` tensor may carry any of them) and never matter, so they are not compared.
"""
from __future__ import annotations

import torch


def batch_major_dense(x: torch.Tensor) -> bool:
    """True when sample b of `x` is one dense block (contiguous, channels_last or channels_last_3d)."""
    if x.is_contiguous():
        return True
    if x.dim() == 4:
        return x.is_contiguous(memory_format=torch.channels_last)
    if x.dim() == 5:
        return x.is_contiguous(memory_format=torch.channels_last_3d)
    return False


def _order(x: torch.Tensor) -> tuple[int | None, ...]:
    """The strides that fix the element order: those of dimensions with more than one element."""
    return tuple(s if n > 1 else None for n, s in zip(x.shape, x.stride()))


def same_layout(*xs: torch.Tensor) -> bool:
    """All of `xs` share one batch-major dense layout, so kernels can read them as flat (B, N) buffers."""
    return batch_major_dense(xs[0]) and all(batch_major_dense(x) and _order(x) == _order(xs[0]) for x in xs[1:])


def as_same_layout(*xs: torch.Tensor) -> list[torch.Tensor]:
    """`xs` unchanged when they share a kernel-readable layout, else contiguous copies."""
    return list(xs) if same_layout(*xs) else [x.contiguous() for x in xs]


def empty_like_layout(ref: torch.Tensor, layout_ok: bool) -> torch.Tensor:
    """An output buffer in `ref`'s layout when kernels read `ref` in place, else contiguous."""
    return torch.empty_like(ref) if layout_ok else torch.empty(ref.shape, dtype=ref.dtype, device=ref.device)


def _byte_range(x: torch.Tensor) -> tuple[int, int, int]:
    """(storage address, first byte, one past the last byte) that `x` can touch."""
    if x.numel() == 0:
        return (0, 0, 0)
    span = 1 + sum((n - 1) * abs(st) for n, st in zip(x.shape, x.stride()))
    start = x.storage_offset() * x.element_size()
    return (x.untyped_storage().data_ptr(), start, start + span * x.element_size())


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when `a` and `b` may share memory (same storage, intersecting byte ranges). Metadata only:
    no device work, so it is free on the hot path."""
    sa, a0, a1 = _byte_range(a)
    sb, b0, b1 = _byte_range(b)
    return sa == sb and sa != 0 and a0 < b1 and b0 < a1
