"""The self-perceptual objective (Lin & Yang, arXiv 2401.00110): schedule -> re-noise -> teacher -> feature MSE."""
from __future__ import annotations

import inspect
import math
import warnings
import weakref
from collections.abc import Sequence

import torch
from torch import nn

from ._per_sample import accumulation_dtype
from ._validation import check_choice, check_finite, check_like, check_tensor
from .ops import feature_mse, renoise
from .ops.feature_mse import REDUCTIONS
from .schedule import NoiseSchedule, TimestepDistribution, is_diffusers_flow_scheduler
from .teacher import FrozenTeacher, unwrap

FEATURE_NORMS = ("none", "channel_rms")


def normalize_features(real: list[torch.Tensor], fake: list[torch.Tensor], how: str,
                       eps: float = 1e-6) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Scale both branches' features of each layer by 1 / RMS of the real features: per sample and per
    channel (dim 1) over the spatial dimensions for (B, C, ...) maps, per sample for (B, N) vectors
    ("channel_rms"); the scale is a constant for autograd. Every channel of every layer then weighs
    alike: without it a tap with large activations dominates the sum (LPL normalises features for the
    same reason)."""
    if how == "none":
        return real, fake
    out_r, out_f = [], []
    for r, f in zip(real, fake):
        dims = tuple(range(2, r.dim())) if r.dim() > 2 else (1,)
        ms = r.float().square().mean(dims, keepdim=True)
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
    trainable = [n for n, p in unwrap(teacher).named_parameters() if p.requires_grad]
    if trainable:  # most likely the student itself: never freeze a caller's model behind its back
        raise ValueError(
            f"teacher: expected a frozen network, got a {type(teacher).__name__} whose parameters require grad "
            f"({trainable[0]!r} and {len(trainable) - 1} more) - is it the student? Pass "
            "fastperc.FrozenTeacher(mse_model) (a frozen copy, built once) or a model already frozen with "
            ".requires_grad_(False)")
    # A frozen plain module is used in place (no copy per call), in eval mode.
    return FrozenTeacher(teacher, layers, copy=False)  # layers=None: the teacher's default tap


_converted = weakref.WeakKeyDictionary()


def as_schedule(schedule) -> NoiseSchedule:
    """A NoiseSchedule as it is, or a diffusers scheduler converted once (cached per scheduler object)."""
    if isinstance(schedule, NoiseSchedule):
        return schedule
    if isinstance(getattr(schedule, "alphas_cumprod", None), torch.Tensor) or is_diffusers_flow_scheduler(schedule):
        try:
            return _converted[schedule]
        except (KeyError, TypeError):
            converted = NoiseSchedule.from_diffusers(schedule)
            try:
                _converted[schedule] = converted
            except TypeError:  # not weak-referenceable: convert per call
                pass
            return converted
    raise TypeError(f"schedule: expected a fastperc.NoiseSchedule or a diffusers scheduler (DDPMScheduler, ...), "
                    f"got {type(schedule).__name__}; build one with NoiseSchedule.scaled_linear() or "
                    "NoiseSchedule.from_diffusers(scheduler)")


# Per-sample conditioning a teacher gets: each must have the batch size of model_output.
_PER_SAMPLE_KWARGS = ("encoder_hidden_states", "class_labels", "timestep_cond", "pooled_projections", "text_embeds",
                      "time_ids", "encoder_attention_mask")


def _check_teacher_kwargs(kwargs: dict, batch: int, prefix: str = "teacher_kwargs") -> None:
    for name, value in kwargs.items():
        if isinstance(value, dict):
            _check_teacher_kwargs(value, batch, f"{prefix}[{name!r}]")
        elif name in _PER_SAMPLE_KWARGS and isinstance(value, torch.Tensor) and value.dim() >= 1 \
                and value.shape[0] != batch:
            raise ValueError(f"{prefix}[{name!r}]: expected batch size {batch} (as model_output), got shape "
                             f"{tuple(value.shape)}")


def _describe(kwargs: dict) -> str:
    def one(v):
        if isinstance(v, torch.Tensor):
            return f"Tensor{tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}: {one(x)}" for k, x in v.items()) + "}"
        return type(v).__name__
    return "{" + ", ".join(f"{k}: {one(v)}" for k, v in kwargs.items()) + "}" if kwargs else "nothing"


def _call_teacher(frozen: FrozenTeacher, sample, timesteps, kwargs: dict):
    """The teacher's features; a failure in eager mode is re-raised naming teacher_kwargs, with what the
    teacher got and what its forward takes (the usual cause: missing or wrong conditioning)."""
    if torch.compiler.is_compiling():
        return frozen(sample, timesteps, **kwargs)
    try:
        return frozen(sample, timesteps, **kwargs)
    except (RuntimeError, TypeError, ValueError, IndexError, AttributeError) as e:
        try:
            takes = str(inspect.signature(frozen.model.forward))
        except (TypeError, ValueError):
            takes = "(unknown)"
        raise ValueError(
            f"teacher_kwargs: the teacher {type(frozen.model).__name__} failed on sample {tuple(sample.shape)} "
            f"{str(sample.dtype).replace('torch.', '')} with {_describe(kwargs)}: {type(e).__name__}: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}. Its forward takes {takes}; pass the "
            "conditioning the student got (encoder_hidden_states=..., class_labels=...)") from e


def self_perceptual_loss(teacher: nn.Module, model_output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                         timesteps: torch.Tensor, schedule: NoiseSchedule, *, prediction_type: str | None = None,
                         layers: Sequence[str] | None = None, layer_weights: Sequence[float] | None = None,
                         teacher_kwargs: dict | None = None, timesteps_prime: torch.Tensor | None = None,
                         reduction: str = "mean", backend: str = "auto",
                         generator: torch.Generator | None = None, check_values: bool = False,
                         feature_norm: str = "none") -> torch.Tensor:
    """Self-perceptual loss: compare a frozen teacher's features of the truth and of the prediction,
    both re-noised to a fresh timestep t'. Replaces `F.mse_loss(model_output, target)` in a step.

    The math, per sample, with alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t) from `schedule`:

        x_t            = alpha_t * x0 + sigma_t * noise
        x0_hat, eps_hat = convert(x_t, model_output)     # v: x0_hat = alpha x_t - sigma p, eps_hat = sigma x_t + alpha p
        t'             ~ uniform on 0..T-1 (or `timesteps_prime`)
        real           = alpha_t' * x0     + sigma_t' * noise
        fake           = alpha_t' * x0_hat + sigma_t' * eps_hat       (= a * x_t + b * model_output)
        loss           = sum_l w_l * mean((F_l(fake, t') - F_l(real, t'))^2)

    With a flow-matching schedule (NoiseSchedule.flow_matching(), or diffusers'
    FlowMatchEulerDiscreteScheduler) the same with alpha = 1 - s, sigma = s, s = t / T, and
    model_output the flow prediction v ~ noise - x0: x0_hat = x_t - s v, eps_hat = x_t + (1 - s) v,
    so fake = x_t + (s' - s) v (one Euler step from s to s').

    F_l is the output of tapped layer l of the frozen teacher; gradients reach model_output through
    the fake branch only (the real branch runs without autograd; the teacher's weights get none).

    Args:
        teacher: a FrozenTeacher, or a plain nn.Module that is already frozen (no parameter requires
            grad; used in place, in eval mode, tapped at `layers`, default ("mid_block",)); a module
            with trainable parameters is refused (it is usually the student). Use the MSE-pretrained
            model, not its EMA.
        model_output: the student's prediction at x_t = add_noise(x0, noise, timesteps), (B, ...); it
            may be bf16/fp16 while x0 and noise are fp32 (the re-noise runs in the widest dtype).
        x0, noise: the clean batch and the noise used to make x_t, same shape as model_output.
        timesteps: (B,) timesteps of x_t: integers 0..T-1 for a DDPM-style (variance-preserving)
            table; for a flow-matching schedule the scheduler's float timesteps sigma * T, as
            `scheduler.timesteps[indices]` gives them in diffusers' training scripts (sigma = t / T).
        schedule: the NoiseSchedule used for training, or the diffusers scheduler itself (converted
            once with NoiseSchedule.from_diffusers and cached).
        prediction_type: "epsilon", "v_prediction" or "sample" on a variance-preserving table,
            "flow_prediction" (noise - x0) on a flow-matching one; default the schedule's.
        layers: layers to tap when `teacher` is a plain module (must match a FrozenTeacher's; default: the
            teacher's default tap, see FrozenTeacher).
        layer_weights: one finite weight >= 0 per layer (default 1.0).
        teacher_kwargs: passed to both teacher calls (encoder_hidden_states, class_labels, ...).
        timesteps_prime: (B,) re-noise timesteps t' (of the same kind as `timesteps`), or a
            TimestepDistribution to draw them from (a range, a logit-normal or mode density); default
            uniform over the table's T entries, one per sample (the paper): 0..T-1, or for a
            flow-matching schedule the table's float timesteps.
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
    schedule = as_schedule(schedule)
    prediction_type = prediction_type if prediction_type is not None else schedule.prediction_type
    schedule.check_prediction_type(prediction_type)
    check_choice("reduction", reduction, REDUCTIONS)
    check_choice("feature_norm", feature_norm, FEATURE_NORMS)
    check_tensor("model_output", model_output, ndim_min=2)
    check_tensor("x0", x0)
    check_like("x0", x0, "model_output", model_output, dtype=False)
    check_tensor("noise", noise)
    check_like("noise", noise, "x0", x0)
    if model_output.shape[0] == 0:
        raise ValueError(f"model_output: expected at least one sample, got shape {tuple(model_output.shape)}")
    if layer_weights is not None:
        layer_weights = check_layer_weights(layer_weights)
    if check_values:
        check_finite("x0", x0)
        check_finite("noise", noise)
    batch, device, T = x0.shape[0], x0.device, schedule.num_train_timesteps
    schedule.check_timesteps("timesteps", timesteps, batch, device, host=check_values)
    if timesteps_prime is None:
        timesteps_prime = TimestepDistribution()
    if isinstance(timesteps_prime, TimestepDistribution):
        timesteps_prime = timesteps_prime.sample(batch, T, generator, device, schedule=schedule)
    else:
        schedule.check_timesteps("timesteps_prime", timesteps_prime, batch, device, host=check_values)
    if teacher_kwargs is not None and not isinstance(teacher_kwargs, dict):
        raise TypeError(f"teacher_kwargs: expected a dict or None, got {type(teacher_kwargs).__name__}")
    frozen = _as_teacher(teacher, layers)
    if layer_weights is not None and len(layer_weights) != len(frozen.layers):
        raise ValueError(f"layer_weights: expected {len(frozen.layers)} values (one per layer in "
                         f"{frozen.layers}), got {len(layer_weights)}")
    kwargs = teacher_kwargs or {}
    _check_teacher_kwargs(kwargs, batch)

    # Mixed precision as training scripts run it: a bf16/fp16 prediction with fp32 latents and noise is
    # re-noised in the widest dtype (as F.mse_loss(pred.float(), target.float())); the teacher then
    # casts its inputs to its own dtype.
    wide = torch.promote_types(model_output.dtype, x0.dtype)
    model_output, x0, noise = model_output.to(wide), x0.to(wide), noise.to(wide)
    coef_dtype = accumulation_dtype(wide)
    a, b, alpha_prime, sigma_prime = schedule.renoise_coefficients(timesteps, timesteps_prime, prediction_type,
                                                                   coef_dtype)
    x_t = schedule._add_noise(x0, noise, timesteps)  # arguments checked above
    fake, real = renoise(x_t, model_output, x0, noise, a, b, alpha_prime, sigma_prime, backend=backend)
    with torch.no_grad():  # the real branch keeps no graph
        real_feats = _call_teacher(frozen, real, timesteps_prime, kwargs)
    fake_feats = _call_teacher(frozen, fake, timesteps_prime, kwargs)
    real_feats, fake_feats = normalize_features(real_feats, fake_feats, feature_norm)
    return feature_mse(fake_feats, real_feats, layer_weights, reduction, backend=backend, consume_targets=True)


def check_layer_weights(weights) -> list[float]:
    w = [float(x) for x in weights]
    if not all(math.isfinite(x) and x >= 0 for x in w):
        raise ValueError(f"layer_weights: expected finite values >= 0 (one per layer), got {w}")
    return w


_warned_default = False


def _warn_default_schedule() -> None:
    global _warned_default
    if not _warned_default:
        _warned_default = True
        warnings.warn("fastperc: SelfPerceptualLoss without a schedule assumes NoiseSchedule.scaled_linear(): "
                      "Stable Diffusion's betas rescaled to zero terminal SNR, v-prediction (the paper's). Pass "
                      "schedule=<your diffusers scheduler or NoiseSchedule> if you train with another one",
                      RuntimeWarning, stacklevel=3)


class SelfPerceptualLoss(nn.Module):
    """Module form of `self_perceptual_loss`: holds the frozen teacher, the schedule and the options.

    Args:
        teacher: the MSE-pretrained model (copied and frozen unless it is already a FrozenTeacher).
        schedule: NoiseSchedule or diffusers scheduler (default NoiseSchedule.scaled_linear(), the
            paper's zero-terminal-SNR v-prediction table, with a one-time warning saying so: pass the
            scheduler your training step uses).
        layers: layers to tap (default: FrozenTeacher's, the midblock of a UNet, a mid-depth block of a
            transformer); layer_weights: one per layer.
        prediction_type, reduction, backend, check_values: as in self_perceptual_loss.
        teacher_dtype: optional dtype for the teacher's weights (e.g. torch.bfloat16).
        teacher_checkpoint: recompute the teacher's activations in backward, one stage at a time
            (see FrozenTeacher's `checkpoint`).

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
                 teacher_dtype: torch.dtype | None = None, teacher_checkpoint: bool = False,
                 check_values: bool = False):
        super().__init__()
        if isinstance(teacher, FrozenTeacher):
            if layers is not None and tuple(layers) != teacher.layers:
                raise ValueError(f"layers: the FrozenTeacher taps {teacher.layers}, got {tuple(layers)}")
        else:
            teacher = FrozenTeacher(teacher, layers, dtype=teacher_dtype,
                                    checkpoint=teacher_checkpoint)
        self.teacher = teacher
        if schedule is None:
            _warn_default_schedule()
            schedule = NoiseSchedule.scaled_linear()
        self.schedule = as_schedule(schedule)
        if layer_weights is not None and len(layer_weights) != len(teacher.layers):
            raise ValueError(f"layer_weights: expected {len(teacher.layers)} values, got {len(layer_weights)}")
        if layer_weights is not None:
            layer_weights = check_layer_weights(layer_weights)
        self.schedule.check_prediction_type(prediction_type or self.schedule.prediction_type)
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
