"""renoise: both teacher inputs of the self-perceptual objective in one pass.

    fake = a * x_t + b * model_output        (the prediction re-noised to t')
    real = alpha' * x0 + sigma' * noise      (the truth re-noised to t')

with per-sample coefficients from NoiseSchedule.renoise_coefficients. Backward: grad model_output =
b * grad_fake (and a * grad_fake, alpha' * grad_real, sigma' * grad_real for the other inputs, when
they require grad).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._per_sample import accumulation_dtype, per_sample
from .._validation import check_like, check_tensor
from . import _backend, _ext, reference
from ._layout import as_same_layout, empty_like_layout, same_layout
from ..errors import InputError

COEF_NAMES = ("a", "b", "alpha_prime", "sigma_prime")


def _run(x_t: Tensor, p: Tensor, x0: Tensor, noise: Tensor, coefs: Tensor, fake: Tensor, real: Tensor,
         backend: str) -> None:
    """Write both teacher inputs into `fake` and `real`; all six tensors share one layout (see _layout)."""
    if p.numel() == 0:  # nothing to write, on every backend alike
        return
    if backend == "cpu":
        _ext.ext.renoise_cpu(x_t, p, x0, noise, coefs, fake, real)
    elif backend == "cuda":
        _ext.ext.renoise_cuda(x_t, p, x0, noise, coefs, fake, real)
    elif backend == "triton":
        from ._triton import renoise as tri
        tri.forward(x_t, p, x0, noise, coefs, fake, real)
    else:  # the reference is plain autograd over reference.py (renoise below), never a custom op
        raise InputError(f"backend: the fused op runs 'cpu', 'cuda' or 'triton', got {backend!r}")


@torch.library.custom_op("fastperc::renoise", mutates_args=())
def _renoise_op(x_t: Tensor, model_output: Tensor, x0: Tensor, noise: Tensor, coefs: Tensor,
                backend: str) -> tuple[Tensor, Tensor]:
    xt, p, x0c, e = as_same_layout(x_t, model_output, x0, noise)
    fake, real = torch.empty_like(p), torch.empty_like(p)
    _run(xt, p, x0c, e, coefs, fake, real, backend)
    return fake, real


@_renoise_op.register_fake
def _(x_t, model_output, x0, noise, coefs, backend):
    ok = same_layout(x_t, model_output, x0, noise)
    return empty_like_layout(model_output, ok), empty_like_layout(model_output, ok)


def _setup_context(ctx, inputs, output):
    x_t, model_output, x0, noise, coefs, _ = inputs
    ctx.save_for_backward(coefs)


def _backward(ctx, grad_fake, grad_real):
    (coefs,) = ctx.saved_tensors
    need = ctx.needs_input_grad

    def scaled(g, row, like_needed):
        if not like_needed or g is None:
            return None
        return (g * per_sample(coefs[row], g)).to(g.dtype)

    return (scaled(grad_fake, 0, need[0]), scaled(grad_fake, 1, need[1]), scaled(grad_real, 2, need[2]),
            scaled(grad_real, 3, need[3]), None, None)


_renoise_op.register_autograd(_backward, setup_context=_setup_context)


def _check(x_t, model_output, x0, noise, coefs) -> None:
    check_tensor("model_output", model_output)
    check_like("x_t", x_t, "model_output", model_output)
    check_like("x0", x0, "model_output", model_output)
    check_like("noise", noise, "model_output", model_output)
    for name, c in zip(COEF_NAMES, coefs):
        check_tensor(name, c)
        if c.shape != (model_output.shape[0],):
            raise InputError(f"{name}: expected shape ({model_output.shape[0]},) (one per sample), got {tuple(c.shape)}")
        if c.device != model_output.device:
            raise InputError(f"{name}: expected device {model_output.device}, got {c.device}")


def renoise(x_t: Tensor, model_output: Tensor, x0: Tensor, noise: Tensor, a: Tensor, b: Tensor,
            alpha_prime: Tensor, sigma_prime: Tensor, *, backend: str = "auto") -> tuple[Tensor, Tensor]:
    """Compute (fake, real), the two teacher inputs, in one pass over the four images.

    Args:
        x_t, model_output, x0, noise: (B, ...) tensors of one shape, dtype and device.
        a, b, alpha_prime, sigma_prime: (B,) per-sample coefficients (used in float32, or float64
            for float64 images), e.g. from NoiseSchedule.renoise_coefficients(t, t', prediction_type).
        backend: "auto", "reference", "cpu", "triton" or "cuda".

    Returns:
        (fake, real), each like model_output. Differentiable (fake w.r.t. x_t and model_output, real
        w.r.t. x0 and noise); in training only model_output requires grad.

    Example:
        >>> import torch, fastperc
        >>> s = fastperc.NoiseSchedule.scaled_linear()
        >>> x0, eps, p = torch.randn(3, 2, 1, 4, 4).unbind(0)
        >>> t, t2 = torch.tensor([5, 700]), torch.tensor([300, 20])
        >>> x_t = s.add_noise(x0, eps, t)
        >>> fake, real = fastperc.ops.renoise(x_t, p, x0, eps, *s.renoise_coefficients(t, t2))
    """
    coefs = (a, b, alpha_prime, sigma_prime)
    _check(x_t, model_output, x0, noise, coefs)
    name = _backend.resolve(backend, model_output.device)
    if name == "reference":  # plain PyTorch autograd: the truth the fused op is tested against
        return reference.renoise(x_t, model_output, x0, noise, *(c.detach() for c in coefs))
    coef = torch.stack([c.detach() for c in coefs]).to(accumulation_dtype(model_output.dtype))
    return _renoise_op(x_t, model_output, x0, noise, coef, name)
