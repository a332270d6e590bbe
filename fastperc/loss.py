"""The self-perceptual objective (Lin & Yang, arXiv 2401.00110): schedule -> re-noise -> teacher -> feature MSE."""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ._validation import check_choice, check_finite, check_like, check_tensor, check_timesteps
from .ops import feature_mse, renoise
from .ops.feature_mse import REDUCTIONS
from .schedule import PREDICTION_TYPES, NoiseSchedule, TimestepDistribution
from .teacher import FrozenTeacher

DEFAULT_LAYERS = ("mid_block",)
FEATURE_NORMS = ("none", "channel_rms")


def normalize_features(real: list[torch.Tensor], fake: list[torch.Tensor], how: str,
                       eps: float = 1e-6) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Scale both branches' features of each layer by 1 / RMS of the real features, per sample and per
    channel (dim 1), over the remaining dimensions ("channel_rms"); the scale is a constant for
    autograd. Every channel of every layer then weighs alike: without it a tap with large activations
    dominates the sum (LPL normalises features for the same reason)."""
    if how == "none":
        return real, fake
    out_r, out_f = [], []
    for r, f in zip(real, fake):
        dims = tuple(range(2, r.dim()))
        ms = r.float().square().mean(dims, keepdim=True) if dims else r.float().square()
        scale = (ms + eps).rsqrt().to(r.dtype)
        out_r.append(r * scale)
        out_f.append(f * scale)
    return out_r, out_f


def _as_teacher(teacher, layers) -> FrozenTeacher:
    if isinstance(teacher, FrozenTeacher):
        if layers is not None and tuple(layers) != teacher.layers:
            raise ValueError(f"layers: the FrozenTeacher taps {teacher.layers}, got {tuple(layers)}; build the "
                             "FrozenTeacher with those layers or pass layers=None")
        return teacher
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher: expected a FrozenTeacher or a torch.nn.Module, got {type(teacher).__name__}")
    # A plain module is frozen in place (no copy per call); FrozenTeacher(model) keeps a copy instead.
    return FrozenTeacher(teacher, layers if layers is not None else DEFAULT_LAYERS, copy=False)


def self_perceptual_loss(teacher: nn.Module, model_output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                         timesteps: torch.Tensor, schedule: NoiseSchedule, *, prediction_type: str | None = None,
                         layers: Sequence[str] | None = None, layer_weights: Sequence[float] | None = None,
                         teacher_kwargs: dict | None = None, timesteps_prime: torch.Tensor | None = None,
                         reduction: str = "mean", backend: str = "auto",
                         generator: torch.Generator | None = None, check_values: bool = False,
                         feature_norm: str = "none") -> torch.Tensor:
    """Self-perceptual loss: compare a frozen teacher's features of the truth and of the prediction,
    both re-noised to a fresh timestep t'. Replaces `F.mse_loss(model_output, target)` in a step.

    Args:
        teacher: a FrozenTeacher, or a plain nn.Module (frozen in place and tapped at `layers`,
            default ("mid_block",)). Use a copy of the MSE-pretrained model, not its EMA.
        model_output: the student's prediction at x_t = add_noise(x0, noise, timesteps), (B, ...).
        x0, noise: the clean batch and the noise used to make x_t, same shape as model_output.
        timesteps: (B,) integer timesteps of x_t.
        schedule: the NoiseSchedule used for training.
        prediction_type: "epsilon", "v_prediction" or "sample"; default the schedule's (v_prediction).
        layers: layers to tap when `teacher` is a plain module (must match a FrozenTeacher's).
        layer_weights: one weight per layer (default 1.0).
        teacher_kwargs: passed to both teacher calls (encoder_hidden_states, class_labels, ...).
        timesteps_prime: (B,) re-noise timesteps t', or a TimestepDistribution to draw them from
            (a range, a logit-normal density); default uniform on 0..T-1, one per sample (the paper).
        reduction: "mean" over the batch, "sum", or "none" for a (B,) loss.
        backend: fused-op backend: "auto", "reference", "cpu", "triton" or "cuda".
        generator: torch.Generator for drawing t'.
        check_values: also check values on the host: x0 and noise finite, timesteps in range, each
            a ValueError naming the argument. Off by default because each check is a host sync on a
            GPU; without it the call makes no host sync (timestep ranges are then checked by a
            device-side assert, and a NaN in the inputs gives a NaN loss, which the caller sees).
            Types, shapes, dtypes and devices are always checked.
        feature_norm: "none" (the paper) or "channel_rms": both branches' features divided by the
            real features' RMS per sample and channel (see `normalize_features`), so every channel of
            every tapped layer counts alike; useful with several taps of different scales.

    Returns:
        The loss (float32, or float64 for float64 inputs): a scalar, or (B,) with reduction="none".
        With one layer and weight 1 it equals F.mse_loss(teacher(fake), teacher(real)).

    Example:
        >>> import torch, fastperc
        >>> from fastperc.models import UNet
        >>> student, schedule = UNet(), fastperc.NoiseSchedule.scaled_linear()
        >>> teacher = fastperc.FrozenTeacher(student)          # normally: the MSE-pretrained model
        >>> x0, noise = torch.randn(4, 1, 32, 32), torch.randn(4, 1, 32, 32)
        >>> t = torch.randint(0, 1000, (4,))
        >>> v = student(schedule.add_noise(x0, noise, t), t)
        >>> loss = fastperc.self_perceptual_loss(teacher, v, x0, noise, t, schedule)
        >>> loss.backward()

    Reference: Lin & Yang, "Diffusion Model with Perceptual Loss", arXiv 2401.00110.
    """
    if not isinstance(schedule, NoiseSchedule):
        raise TypeError(f"schedule: expected a fastperc.NoiseSchedule, got {type(schedule).__name__}")
    kind = prediction_type if prediction_type is not None else schedule.prediction_type
    check_choice("prediction_type", kind, PREDICTION_TYPES)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("feature_norm", feature_norm, FEATURE_NORMS)
    check_tensor("model_output", model_output, ndim_min=2)
    check_like("x0", x0, "model_output", model_output)
    check_like("noise", noise, "model_output", model_output)
    if check_values:
        check_finite("x0", x0)
        check_finite("noise", noise)
    batch, device, T = x0.shape[0], x0.device, schedule.num_train_timesteps
    check_timesteps("timesteps", timesteps, batch, T, device, host=check_values)
    if timesteps_prime is None:
        timesteps_prime = TimestepDistribution()
    if isinstance(timesteps_prime, TimestepDistribution):
        timesteps_prime = timesteps_prime.sample(batch, T, generator, device)
    else:
        check_timesteps("timesteps_prime", timesteps_prime, batch, T, device, host=check_values)
    if teacher_kwargs is not None and not isinstance(teacher_kwargs, dict):
        raise TypeError(f"teacher_kwargs: expected a dict or None, got {type(teacher_kwargs).__name__}")
    frozen = _as_teacher(teacher, layers)
    if layer_weights is not None and len(layer_weights) != len(frozen.layers):
        raise ValueError(f"layer_weights: expected {len(frozen.layers)} values (one per layer in "
                         f"{frozen.layers}), got {len(layer_weights)}")
    kwargs = teacher_kwargs or {}

    coef_dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
    a, b, ap, sp = schedule.renoise_coefficients(timesteps, timesteps_prime, kind, coef_dtype)
    x_t = schedule._add_noise(x0, noise, timesteps)  # arguments checked above
    fake, real = renoise(x_t, model_output, x0, noise, a, b, ap, sp, backend=backend)
    with torch.no_grad():  # the real branch keeps no graph
        real_feats = frozen(real, timesteps_prime, **kwargs)
    fake_feats = frozen(fake, timesteps_prime, **kwargs)
    real_feats, fake_feats = normalize_features(real_feats, fake_feats, feature_norm)
    return feature_mse(fake_feats, real_feats, layer_weights, reduction, backend=backend, consume_targets=True)


class SelfPerceptualLoss(nn.Module):
    """Module form of `self_perceptual_loss`: holds the frozen teacher, the schedule and the options.

    Args:
        teacher: the MSE-pretrained model (copied and frozen unless it is already a FrozenTeacher).
        schedule: NoiseSchedule (default NoiseSchedule.scaled_linear(): the paper's zero-SNR schedule).
        layers: layers to tap (default ("mid_block",)); layer_weights: one per layer.
        prediction_type, reduction, backend, check_values: as in self_perceptual_loss.
        teacher_dtype: optional dtype for the teacher's weights (e.g. torch.bfloat16).

    Example:
        >>> import torch, fastperc
        >>> from fastperc.models import UNet
        >>> student = UNet()
        >>> criterion = fastperc.SelfPerceptualLoss(UNet())   # normally: the MSE-pretrained model
        >>> x0, noise, t = torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32), torch.randint(0, 1000, (2,))
        >>> loss = criterion(student(criterion.schedule.add_noise(x0, noise, t), t), x0, noise, t)
    """

    def __init__(self, teacher: nn.Module, schedule: NoiseSchedule | None = None, *,
                 layers: Sequence[str] | None = None, layer_weights: Sequence[float] | None = None,
                 prediction_type: str | None = None, reduction: str = "mean", backend: str = "auto",
                 teacher_dtype: torch.dtype | None = None, check_values: bool = False):
        super().__init__()
        if isinstance(teacher, FrozenTeacher):
            if layers is not None and tuple(layers) != teacher.layers:
                raise ValueError(f"layers: the FrozenTeacher taps {teacher.layers}, got {tuple(layers)}")
        else:
            teacher = FrozenTeacher(teacher, layers if layers is not None else DEFAULT_LAYERS, dtype=teacher_dtype)
        self.teacher = teacher
        self.schedule = schedule if schedule is not None else NoiseSchedule.scaled_linear()
        if not isinstance(self.schedule, NoiseSchedule):
            raise TypeError(f"schedule: expected a fastperc.NoiseSchedule, got {type(self.schedule).__name__}")
        if layer_weights is not None and len(layer_weights) != len(teacher.layers):
            raise ValueError(f"layer_weights: expected {len(teacher.layers)} values, got {len(layer_weights)}")
        if prediction_type is not None:
            check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        check_choice("reduction", reduction, REDUCTIONS)
        self.layer_weights = None if layer_weights is None else [float(w) for w in layer_weights]
        self.prediction_type, self.reduction, self.backend = prediction_type, reduction, backend
        self.check_values = check_values

    def forward(self, model_output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                *, timesteps_prime: torch.Tensor | None = None, generator: torch.Generator | None = None,
                **teacher_kwargs) -> torch.Tensor:
        return self_perceptual_loss(self.teacher, model_output, x0, noise, timesteps, self.schedule,
                                    prediction_type=self.prediction_type, layer_weights=self.layer_weights,
                                    teacher_kwargs=teacher_kwargs, timesteps_prime=timesteps_prime,
                                    reduction=self.reduction, backend=self.backend, generator=generator,
                                    check_values=self.check_values)

    def extra_repr(self) -> str:
        return f"schedule={self.schedule}, weights={self.layer_weights}, reduction={self.reduction!r}"
