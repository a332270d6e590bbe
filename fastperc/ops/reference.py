"""Pure-PyTorch reference of every fused op: the truth each backend is tested against.

Accumulation is float32 for half/bfloat16/float32 inputs and float64 for float64 inputs.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .._per_sample import accumulation_dtype, per_sample


def _col(c: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return per_sample(c.to(accumulation_dtype(like.dtype)), like)


def renoise(x_t: torch.Tensor, model_output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
            a: torch.Tensor, b: torch.Tensor, alpha_prime: torch.Tensor, sigma_prime: torch.Tensor
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """fake = a*x_t + b*model_output, real = alpha'*x0 + sigma'*noise (per-sample coefficients, shape (B,))."""
    acc = accumulation_dtype(model_output.dtype)
    fake = _col(a, x_t) * x_t.to(acc) + _col(b, x_t) * model_output.to(acc)
    real = _col(alpha_prime, x0) * x0.to(acc) + _col(sigma_prime, x0) * noise.to(acc)
    return fake.to(model_output.dtype), real.to(x0.dtype)


def feature_mse_per_sample(preds: Sequence[torch.Tensor], targets: Sequence[torch.Tensor],
                           weights: Sequence[float]) -> torch.Tensor:
    """(B,) tensor: sum_l w_l * mean over sample b's elements of (p_l - t_l)^2."""
    acc = accumulation_dtype(preds[0].dtype)
    total = None
    for p, t, w in zip(preds, targets, weights):
        d = p.to(acc) - t.detach().to(acc)
        term = d.square().flatten(1).mean(1) * w
        total = term if total is None else total + term
    return total


def reduce(per_sample: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample
