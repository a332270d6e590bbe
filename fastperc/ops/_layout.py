"""Memory-layout rule shared by the fused backends and their fake (meta) kernels."""
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


def same_layout(*xs: torch.Tensor) -> bool:
    """All of `xs` share one batch-major dense layout, so kernels can read them as flat (B, N) buffers."""
    return batch_major_dense(xs[0]) and all(x.stride() == xs[0].stride() for x in xs[1:])


def as_same_layout(*xs: torch.Tensor) -> list[torch.Tensor]:
    """`xs` unchanged when they share a kernel-readable layout, else contiguous copies."""
    return list(xs) if same_layout(*xs) else [x.contiguous() for x in xs]


def empty_like_layout(ref: torch.Tensor, layout_ok: bool) -> torch.Tensor:
    """An output buffer in `ref`'s layout when kernels read `ref` in place, else contiguous."""
    return torch.empty_like(ref) if layout_ok else torch.empty(ref.shape, dtype=ref.dtype, device=ref.device)
