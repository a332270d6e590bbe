"""Per-sample scalars (schedule coefficients, loss weights): the dtype they are computed in and their
broadcast over a batch. The one place that decides both, for the schedule, the loss and every op."""
from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 data, float32 for everything else (half, bfloat16, float32): sums and
    coefficients never run in half precision."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def per_sample(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Shape (B,) -> (B, 1, ..., 1) with `like`'s number of dimensions, so that it multiplies `like`
    sample by sample."""
    return c.reshape(c.shape + (1,) * (like.dim() - c.dim()))
