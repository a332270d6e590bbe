"""feature_mse: the multi-layer feature MSE of the self-perceptual objective.

    per_sample[b] = sum_l w_l * mean_i (p_l[b, i] - t_l[b, i])^2,   grad p_l = 2 w_l (p_l - t_l) / N_l

The fused backends compute the per-sample loss and the gradient in one pass over all layers, so the
backward only scales the stored gradient by grad_output. The pieces:

- `fastperc::feature_mse` (custom_op, functional, register_autograd with the functional
  `fastperc::scale_rows` as backward): what torch.compile traces; inductor plans buffer reuse.
- `fastperc::feature_mse_` (custom_op, mutates targets): writes the gradient over the target
  buffers, saving one feature-sized buffer per layer at the peak (`consume_targets=True`).
- `_ConsumeTargets`: the eager autograd glue of the in-place op.
- backend "reference": plain PyTorch autograd over `reference.py`, no custom op.
- `feature_mse(...)`: the validated public entry point.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from .._per_sample import accumulation_dtype
from .._validation import check_choice, check_weights
from . import _backend, _ext, reference
from ._layout import as_same_layout, batch_major_dense, empty_like_layout, overlaps, same_layout
from ..errors import InputError

REDUCTIONS = ("mean", "sum", "none")


# ---- kernels per backend ---------------------------------------------------------------------------
def _run(preds: list[Tensor], targets: list[Tensor], grads: list[Tensor], weights: list[float],
         backend: str, per_sample: Tensor | None = None) -> Tensor:
    """Per-sample loss into `per_sample` (default a fresh (B,) tensor); gradients into `grads`
    (which may be `targets`). Inputs must already share a kernel-readable layout (see _layout)."""
    p0 = preds[0]
    if per_sample is None:
        per_sample = torch.empty(p0.shape[0], dtype=accumulation_dtype(p0.dtype), device=p0.device)
    if backend == "cpu":
        _ext.ext.feature_mse_cpu(preds, targets, grads, weights, per_sample)
    elif backend == "cuda":
        _ext.ext.feature_mse_cuda(preds, targets, grads, weights, per_sample)
    elif backend == "triton":
        from ._triton import feature_mse as tri
        tri.forward(preds, targets, grads, weights, per_sample)
    else:  # the reference is plain autograd over reference.py (feature_mse below), never a custom op
        raise InputError(f"backend: the fused op runs 'cpu', 'cuda' or 'triton', got {backend!r}")
    return per_sample


def _scale_rows(grads: list[Tensor], scale: Tensor, outs: list[Tensor], backend: str) -> None:
    """outs[l][b, ...] = grads[l][b, ...] * scale[b]; `outs` may be `grads` (in place). The fused
    backends do every layer in one launch; torch's broadcast multiply is the fallback (it runs
    unvectorised: on a GPU at a third of the copy bandwidth for bf16)."""
    scale = scale.to(accumulation_dtype(grads[0].dtype)).contiguous()
    dense = all(batch_major_dense(g) and o.stride() == g.stride() for g, o in zip(grads, outs))
    if dense and backend in ("cpu", "cuda") and _ext.has(f"scale_rows_{backend}"):
        getattr(_ext.ext, f"scale_rows_{backend}")(list(grads), scale, list(outs))
    elif dense and backend == "triton":
        from ._triton import feature_mse as tri
        tri.scale_rows(list(grads), scale, list(outs))
    else:
        for g, o in zip(grads, outs):
            torch.mul(g, scale.reshape((-1,) + (1,) * (g.dim() - 1)), out=o)


@torch.library.custom_op("fastperc::scale_rows", mutates_args=())
def _scale_rows_op(grads: list[Tensor], scale: Tensor, backend: str) -> list[Tensor]:
    """The backward of feature_mse, functional (what torch.compile traces)."""
    outs = [torch.empty_like(g) for g in grads]
    _scale_rows(grads, scale, outs, backend)
    return outs


@_scale_rows_op.register_fake
def _(grads, scale, backend):
    return [torch.empty_like(g) for g in grads]


# ---- functional op (differentiable, compile-friendly) -----------------------------------------------
@torch.library.custom_op("fastperc::feature_mse", mutates_args=())
def _feature_mse_op(preds: list[Tensor], targets: list[Tensor], weights: list[float],
                    backend: str) -> tuple[Tensor, list[Tensor]]:
    pairs = [as_same_layout(p, t) for p, t in zip(preds, targets)]
    ps, ts = [p for p, _ in pairs], [t for _, t in pairs]
    grads = [torch.empty_like(p) for p in ps]  # ps share the targets' kernel-readable layout
    return _run(ps, ts, grads, weights, backend), grads


@_feature_mse_op.register_fake
def _(preds, targets, weights, backend):
    p0 = preds[0]
    per_sample = p0.new_empty((p0.shape[0],), dtype=accumulation_dtype(p0.dtype))
    return per_sample, [empty_like_layout(p, same_layout(p, t)) for p, t in zip(preds, targets)]


def _setup_context(ctx, inputs, output):
    ctx.grads, ctx.backend = output[1], inputs[3]
    ctx.set_materialize_grads(False)  # the gradient outputs get no grad: skip feature-sized zero fills


def _backward(ctx, grad_per_sample, _grad_grads):
    return _scale_rows_op(ctx.grads, grad_per_sample, ctx.backend), [None] * len(ctx.grads), None, None


_feature_mse_op.register_autograd(_backward, setup_context=_setup_context)


# ---- in-place op (eager memory saver) ---------------------------------------------------------------
@torch.library.custom_op("fastperc::feature_mse_", mutates_args=("targets",))
def _feature_mse_inplace_op(preds: list[Tensor], targets: list[Tensor], weights: list[float], backend: str) -> Tensor:
    return _run(list(preds), list(targets), list(targets), weights, backend)


@_feature_mse_inplace_op.register_fake
def _(preds, targets, weights, backend):
    p0 = preds[0]
    return p0.new_empty((p0.shape[0],), dtype=accumulation_dtype(p0.dtype))


class _ConsumeTargets(torch.autograd.Function):
    """Eager consume_targets path: the forward writes the gradient over the targets; the backward
    scales it into a fresh buffer (so retain_graph and gradcheck work)."""

    @staticmethod
    def forward(ctx, weights, backend, targets, *preds):
        ctx.grads, ctx.backend = targets, backend  # after the call the targets hold the gradient
        return _feature_mse_inplace_op(list(preds), list(targets), weights, backend)

    @staticmethod
    def backward(ctx, grad_per_sample):
        return (None, None, None, *_scale_rows_op(ctx.grads, grad_per_sample, ctx.backend))


def _unaliased_targets(preds: list[Tensor], targets: list[Tensor]) -> list[Tensor]:
    """Targets safe to overwrite in layer order: a target that shares memory with any other tensor of
    the call (two taps returning one tensor, views of one buffer, a prediction) is copied first, else
    writing one layer's gradient would change what a later layer reads."""
    out = list(targets)
    for i, t in enumerate(targets):
        others = [x for j, x in enumerate(targets) if j != i] + preds
        if any(overlaps(t, x) for x in others):
            out[i] = t.clone()
    return out


# ---- public entry point -----------------------------------------------------------------------------
def _check(pred_feats, target_feats, weights, reduction) -> tuple[list, list, list[float]]:
    for name, seq in (("pred_feats", pred_feats), ("target_feats", target_feats)):
        if isinstance(seq, Tensor) or not isinstance(seq, Sequence) or not seq:
            raise TypeError(f"{name}: expected a non-empty list or tuple of tensors (one per layer), "
                            f"got {type(seq).__name__}")
    preds, targets = list(pred_feats), list(target_feats)
    if len(preds) != len(targets):
        raise InputError(f"target_feats: expected {len(preds)} tensors (one per predicted layer), got {len(targets)}")
    for i, (p, t) in enumerate(zip(preds, targets)):
        for name, x in ((f"pred_feats[{i}]", p), (f"target_feats[{i}]", t)):
            if not isinstance(x, Tensor):
                raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
            if not x.is_floating_point():
                raise TypeError(f"{name}: expected a floating dtype, got {x.dtype}")
            if x.dim() < 1:
                raise InputError(f"{name}: expected shape (B, ...), got a 0-d tensor")
        if p.shape != t.shape:
            raise InputError(f"target_feats[{i}]: expected shape {tuple(p.shape)} (pred_feats[{i}]), got {tuple(t.shape)}")
        if p.dtype != preds[0].dtype or t.dtype != preds[0].dtype:
            raise TypeError(f"pred_feats[{i}]/target_feats[{i}]: expected dtype {preds[0].dtype} (as layer 0), "
                            f"got {p.dtype}/{t.dtype}")
        if p.device != preds[0].device or t.device != preds[0].device:
            raise InputError(f"pred_feats[{i}]/target_feats[{i}]: expected device {preds[0].device}, "
                             f"got {p.device}/{t.device}")
        if p.shape[0] != preds[0].shape[0]:
            raise InputError(f"pred_feats[{i}]: expected batch size {preds[0].shape[0]} (as layer 0), got {p.shape[0]}")
        # Every backend refuses empty samples alike: a mean over no elements has no value (NaN).
        if p.shape[0] == 0:
            raise InputError(f"pred_feats[{i}]: expected at least one sample, got shape {tuple(p.shape)}")
        if p.numel() == 0:
            raise InputError(f"pred_feats[{i}]: expected at least one element per sample, got shape {tuple(p.shape)}")
    w = [1.0] * len(preds) if weights is None else check_weights("weights", weights, len(preds))
    check_choice("reduction", reduction, REDUCTIONS)
    return preds, targets, w


def feature_mse(pred_feats: Sequence[Tensor], target_feats: Sequence[Tensor],
                weights: Sequence[float] | None = None, reduction: str = "mean", backend: str = "auto",
                consume_targets: bool = False) -> Tensor:
    """Weighted sum over layers of the per-sample feature MSE, with the gradient fused into the forward.

    Args:
        pred_feats: one tensor per layer, each (B, ...); gradients flow into these.
        target_feats: tensors of the same shapes and dtype (never differentiated).
        weights: one finite float >= 0 per layer (default 1.0 each).
        reduction: "mean" over the batch, "sum", or "none" for the (B,) per-sample loss.
        backend: "auto", "reference", "cpu", "triton" or "cuda" (see `python -m fastperc.info`).
        consume_targets: let the kernels write the gradient over `target_feats` (saves one
            feature-sized buffer per layer); the targets are garbage afterwards. Ignored while
            torch.compile traces. With False the caller's tensors are never modified.

    Returns:
        A float32 loss (float64 for float64 inputs): a scalar, or (B,) for reduction="none".
        A NaN/Inf in one sample's features makes only that sample's loss non-finite.

    Example:
        >>> import torch
        >>> from fastperc.ops import feature_mse
        >>> p = [torch.randn(2, 8, 4, 4, requires_grad=True), torch.randn(2, 16, requires_grad=True)]
        >>> t = [torch.randn(2, 8, 4, 4), torch.randn(2, 16)]
        >>> loss = feature_mse(p, t, weights=[1.0, 0.5])
        >>> loss.backward()
    """
    preds, targets, w = _check(pred_feats, target_feats, weights, reduction)
    name = _backend.resolve(backend, preds[0].device)
    targets = [t.detach() for t in targets]
    if name == "reference":  # plain PyTorch autograd: the truth the fused ops are tested against
        per_sample = reference.feature_mse_per_sample(preds, targets, w)
    elif consume_targets and not torch.compiler.is_compiling():
        pairs = [as_same_layout(p, t) for p, t in zip(preds, targets)]  # a copied target is ours to overwrite
        writable = _unaliased_targets([p for p, _ in pairs], [t for _, t in pairs])
        per_sample = _ConsumeTargets.apply(w, name, writable, *[p for p, _ in pairs])
    else:  # the functional op; under torch.compile inductor plans buffer reuse itself
        per_sample = _feature_mse_op(preds, targets, w, name)[0]
    return reference.reduce(per_sample, reduction)
