"""The self-perceptual objective (Lin & Yang, arXiv 2401.00110): schedule -> re-noise -> teacher -> feature MSE."""
from __future__ import annotations

import inspect
import math
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ._per_sample import accumulation_dtype
from ._validation import check_choice, check_finite, check_like, check_tensor, check_weights
from .ops import feature_mse, renoise
from .ops.feature_mse import REDUCTIONS
from .schedule import NoiseSchedule, TimestepDistribution, is_diffusers_flow_scheduler
from .teacher import FrozenTeacher, unwrap
from .errors import InputError

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


class _TeacherCache(dict):
    """The FrozenTeacher wrappers of one frozen plain module, by layers. Kept on the module itself (in
    its __dict__, not as a submodule), so no global table keeps a module alive: module and wrappers form
    a cycle that Python's cycle collector frees together. Deep copies and pickles of the module start
    with an empty cache; a shallow copy, which shares it, gets its own on first use."""

    def __deepcopy__(self, memo):
        return _TeacherCache()

    def __reduce__(self):
        return (_TeacherCache, ())


_CACHE = "_fastperc_frozen_teachers"


def as_teacher(teacher, layers: Sequence[str] | None = None) -> FrozenTeacher:
    """The FrozenTeacher the function form uses: a FrozenTeacher as it is, or a frozen plain module wrapped
    in place (no copy) once and reused on every later call (cached per module and layers).

    A module with trainable parameters is refused (it is usually the student): nothing is frozen
    behind the caller's back."""
    if isinstance(teacher, FrozenTeacher):
        if layers is not None and tuple(layers) != teacher.layers:
            raise InputError(f"layers: the FrozenTeacher taps {teacher.layers}, got {tuple(layers)}; build the "
                             "FrozenTeacher with those layers or pass layers=None")
        return teacher
    if not isinstance(teacher, nn.Module):
        raise TypeError(f"teacher: expected a FrozenTeacher or a torch.nn.Module, got {type(teacher).__name__}")
    model = unwrap(teacher)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if trainable:  # most likely the student itself: never freeze a caller's model behind its back
        raise InputError(
            f"teacher: expected a frozen network, got a {type(teacher).__name__} whose parameters require grad "
            f"({trainable[0]!r} and {len(trainable) - 1} more) - is it the student? Pass "
            "fastperc.FrozenTeacher(mse_model) (a frozen copy, built once) or a model already frozen with "
            ".requires_grad_(False)")
    cache = model.__dict__.get(_CACHE)
    if cache is None or any(f.model is not model for f in cache.values()):  # none yet, or a shallow copy's
        cache = model.__dict__[_CACHE] = _TeacherCache()
    key = None if layers is None else (layers,) if isinstance(layers, str) else tuple(layers)
    frozen = cache.get(key)
    if frozen is None:
        frozen = cache[key] = FrozenTeacher(model, key, copy=False)  # None: the teacher's default tap
    elif model.training:  # put back in train mode by its owner since the last call
        model.eval()
    return frozen


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
# ... and those that may also be per sample (or broadcast): the objective on a share of the batch gives
# the teacher the first k rows of each that has one row per sample.
_ROW_KWARGS = _PER_SAMPLE_KWARGS + ("attention_mask", "guidance", "resolution", "aspect_ratio")


def _first_rows(kwargs: dict, k: int, batch: int) -> dict:
    """teacher_kwargs for the first k of `batch` samples: per-sample tensors (nested dicts too) sliced,
    the rest (Flux's position ids, a broadcast guidance, attention processors' options) as they are."""
    out = {}
    for name, value in kwargs.items():
        if isinstance(value, dict):
            out[name] = _first_rows(value, k, batch)
        elif name in _ROW_KWARGS and isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == batch:
            out[name] = value[:k]
        else:
            out[name] = value
    return out


def teacher_batch(batch: int, batch_fraction: float) -> int:
    """How many samples of a batch the teacher sees: k = ceil(batch_fraction * batch), at least one
    (static: it depends on shapes only, so a compiled step keeps its graph)."""
    return min(batch, max(1, math.ceil(round(batch_fraction * batch, 6))))  # round: 0.3 * 10 is 3.0000000000000004


def _check_teacher_kwargs(frozen: FrozenTeacher, kwargs: dict, batch: int) -> None:
    """The conditioning the teacher's architecture cannot run without is there, and every per-sample
    input has the batch size of model_output: both named as teacher_kwargs errors before the teacher runs."""
    missing = [name for name in frozen.required_kwargs if kwargs.get(name) is None]
    if missing:
        raise InputError(
            f"teacher_kwargs: the teacher {type(frozen.model).__name__} needs {', '.join(missing)}, got "
            f"{_describe(kwargs)}; pass the conditioning the student got "
            f"({', '.join(f'{name}=...' for name in missing)})")
    _check_batch(kwargs, batch)


def _check_batch(kwargs: dict, batch: int, prefix: str = "teacher_kwargs") -> None:
    for name, value in kwargs.items():
        if isinstance(value, dict):
            _check_batch(value, batch, f"{prefix}[{name!r}]")
        elif name in _PER_SAMPLE_KWARGS and isinstance(value, torch.Tensor) and value.dim() >= 1 \
                and value.shape[0] != batch:
            raise InputError(f"{prefix}[{name!r}]: expected batch size {batch} (as model_output), got shape "
                             f"{tuple(value.shape)}")


def _describe(kwargs: dict) -> str:
    def one(v):
        if isinstance(v, torch.Tensor):
            return f"Tensor{tuple(v.shape)} {str(v.dtype).replace('torch.', '')}"
        if isinstance(v, dict):
            return "{" + ", ".join(f"{k}: {one(x)}" for k, x in v.items()) + "}"
        return type(v).__name__
    return "{" + ", ".join(f"{k}: {one(v)}" for k, v in kwargs.items()) + "}" if kwargs else "nothing"


_OUT_OF_MEMORY = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)  # top-level from torch 2.5


def _call_teacher(frozen: FrozenTeacher, sample, timesteps, kwargs: dict):
    """The teacher's features. An exception raised inside the teacher keeps its type (a bug in a model,
    a dtype mismatch, running out of memory are not the caller's conditioning); in eager mode it gets
    a note saying what the teacher was given and what its forward takes."""
    if torch.compiler.is_compiling():
        return frozen(sample, timesteps, **kwargs)
    try:
        return frozen(sample, timesteps, **kwargs)
    except _OUT_OF_MEMORY:
        raise  # what the teacher got does not explain it
    except Exception as e:
        if hasattr(e, "add_note"):  # Python >= 3.11
            try:
                takes = str(inspect.signature(frozen.model.forward))
            except (TypeError, ValueError):
                takes = "(unknown)"
            e.add_note(f"fastperc: raised inside the teacher {type(frozen.model).__name__}, called on sample "
                       f"{tuple(sample.shape)} {str(sample.dtype).replace('torch.', '')} with teacher_kwargs "
                       f"{_describe(kwargs)}; its forward takes {takes}")
        raise


@dataclass(frozen=True)
class _Recipe:
    """The options of the objective, checked once by `checked`: SelfPerceptualLoss holds one, the
    function form builds one per call. One validation path for both forms."""
    layer_weights: tuple[float, ...] | None
    feature_norm: str
    timesteps_prime: torch.Tensor | TimestepDistribution | None
    prediction_type: str | None
    reduction: str
    backend: str
    check_values: bool
    batch_fraction: float = 1.0

    @classmethod
    def checked(cls, *, layer_weights=None, feature_norm="none", timesteps_prime=None, prediction_type=None,
                reduction="mean", backend="auto", check_values=False, batch_fraction=1.0) -> "_Recipe":
        check_choice("reduction", reduction, REDUCTIONS)
        check_choice("feature_norm", feature_norm, FEATURE_NORMS)
        if layer_weights is not None:  # the count is checked against the teacher's layers
            layer_weights = tuple(check_weights("layer_weights", layer_weights, len(layer_weights)))
        if timesteps_prime is not None and not isinstance(timesteps_prime, (torch.Tensor, TimestepDistribution)):
            raise TypeError(f"timesteps_prime: expected None, a (B,) tensor or a fastperc.TimestepDistribution, got "
                            f"{type(timesteps_prime).__name__}")
        if not isinstance(check_values, bool):
            raise TypeError(f"check_values: expected a bool, got {type(check_values).__name__}")
        if isinstance(batch_fraction, bool) or not isinstance(batch_fraction, (int, float)) \
                or not 0 < batch_fraction <= 1:
            raise InputError(f"batch_fraction: expected a number in (0, 1], got {batch_fraction!r}")
        return cls(layer_weights, feature_norm, timesteps_prime, prediction_type, reduction, backend, check_values,
                   float(batch_fraction))

    def weights_for(self, teacher: FrozenTeacher) -> list[float] | None:
        if self.layer_weights is not None and len(self.layer_weights) != len(teacher.layers):
            raise InputError(f"layer_weights: expected {len(teacher.layers)} values (one per layer in "
                             f"{teacher.layers}), got {len(self.layer_weights)}")
        return None if self.layer_weights is None else list(self.layer_weights)


def _objective(frozen: FrozenTeacher, schedule: NoiseSchedule, recipe: _Recipe, model_output: torch.Tensor,
               x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, timesteps_prime,
               generator: torch.Generator | None, kwargs: dict) -> torch.Tensor:
    """The objective itself, shared by the module and the function: the per-call checks, then
    schedule -> re-noise -> teacher -> feature MSE."""
    prediction_type = recipe.prediction_type if recipe.prediction_type is not None else schedule.prediction_type
    schedule.check_prediction_type(prediction_type)
    check_tensor("model_output", model_output, ndim_min=2)
    check_tensor("x0", x0)
    check_like("x0", x0, "model_output", model_output, dtype=False)
    check_tensor("noise", noise)
    check_like("noise", noise, "x0", x0)
    if model_output.shape[0] == 0:
        raise InputError(f"model_output: expected at least one sample, got shape {tuple(model_output.shape)}")
    if recipe.check_values:
        check_finite("x0", x0)
        check_finite("noise", noise)
    batch, device, T = x0.shape[0], x0.device, schedule.num_train_timesteps
    schedule.check_timesteps("timesteps", timesteps, batch, device, host=recipe.check_values)
    if timesteps_prime is None:
        timesteps_prime = recipe.timesteps_prime if recipe.timesteps_prime is not None else TimestepDistribution()
    if isinstance(timesteps_prime, TimestepDistribution):
        timesteps_prime = timesteps_prime.sample(batch, T, generator, device, schedule=schedule)
    else:
        schedule.check_timesteps("timesteps_prime", timesteps_prime, batch, device, host=recipe.check_values)
    weights = recipe.weights_for(frozen)
    _check_teacher_kwargs(frozen, kwargs, batch)

    # Mixed precision as training scripts run it: a bf16/fp16 prediction with fp32 latents and noise is
    # re-noised in the widest dtype (as F.mse_loss(pred.float(), target.float())); the teacher then
    # casts its inputs to its own dtype.
    wide = torch.promote_types(model_output.dtype, x0.dtype)
    model_output, x0, noise = model_output.to(wide), x0.to(wide), noise.to(wide)
    k = teacher_batch(batch, recipe.batch_fraction)
    if k < batch:  # the teacher on the first k samples; plain MSE to the schedule's target on the rest
        rest = slice(k, None)
        target = schedule.target(x0[rest], noise[rest], timesteps[rest], prediction_type)
        mse = (model_output[rest] - target).square().flatten(1).mean(1).to(accumulation_dtype(wide))
        sp = _self_perceptual(frozen, schedule, recipe, weights, prediction_type, model_output[:k], x0[:k], noise[:k],
                              timesteps[:k], timesteps_prime[:k], _first_rows(kwargs, k, batch), "none")
        per_sample = torch.cat([sp, mse])
        return {"none": per_sample, "mean": per_sample.mean(), "sum": per_sample.sum()}[recipe.reduction]
    return _self_perceptual(frozen, schedule, recipe, weights, prediction_type, model_output, x0, noise, timesteps,
                            timesteps_prime, kwargs, recipe.reduction)


def _self_perceptual(frozen, schedule, recipe, weights, prediction_type, model_output, x0, noise, timesteps,
                     timesteps_prime, kwargs, reduction) -> torch.Tensor:
    """schedule -> re-noise -> teacher -> feature MSE on checked inputs of one dtype."""
    coef_dtype = accumulation_dtype(model_output.dtype)
    a, b, alpha_prime, sigma_prime = schedule.renoise_coefficients(timesteps, timesteps_prime, prediction_type,
                                                                   coef_dtype)
    x_t = schedule.add_noise(x0, noise, timesteps, check=False)  # arguments checked above
    fake, real = renoise(x_t, model_output, x0, noise, a, b, alpha_prime, sigma_prime, backend=recipe.backend)
    with torch.no_grad():  # the real branch keeps no graph
        real_feats = _call_teacher(frozen, real, timesteps_prime, kwargs)
    fake_feats = _call_teacher(frozen, fake, timesteps_prime, kwargs)
    real_feats, fake_feats = normalize_features(real_feats, fake_feats, recipe.feature_norm)
    return feature_mse(fake_feats, real_feats, weights, reduction, backend=recipe.backend, consume_targets=True)


def self_perceptual_loss(teacher: nn.Module, model_output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor,
                         timesteps: torch.Tensor, schedule: NoiseSchedule, *, prediction_type: str | None = None,
                         layers: Sequence[str] | None = None, layer_weights: Sequence[float] | None = None,
                         teacher_kwargs: dict | None = None,
                         timesteps_prime: torch.Tensor | TimestepDistribution | None = None,
                         reduction: str = "mean", backend: str = "auto",
                         generator: torch.Generator | None = None, check_values: bool = False,
                         feature_norm: str = "none", batch_fraction: float = 1.0) -> torch.Tensor:
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
        batch_fraction: the share f of the batch the teacher sees, in (0, 1]: the objective on the first
            k = ceil(f * B) samples (shuffle the batch as usual; the shapes stay static), plain MSE to
            the schedule's target on the other B - k, and the mean over all B (with reduction="none",
            per sample in batch order). The teacher's cost scales with k. Default 1 (the paper).

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
    recipe = _Recipe.checked(layer_weights=layer_weights, feature_norm=feature_norm, timesteps_prime=timesteps_prime,
                             prediction_type=prediction_type, reduction=reduction, backend=backend,
                             check_values=check_values, batch_fraction=batch_fraction)
    if teacher_kwargs is not None and not isinstance(teacher_kwargs, dict):
        raise TypeError(f"teacher_kwargs: expected a dict or None, got {type(teacher_kwargs).__name__}")
    return _objective(as_teacher(teacher, layers), as_schedule(schedule), recipe, model_output, x0, noise, timesteps,
                      None, generator, teacher_kwargs or {})


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
    """The self-perceptual objective as a module: the frozen teacher, the schedule and every option of
    the recipe, set once; `self_perceptual_loss` is its function form, with the same options under the
    same names (see it for the math).

    Args:
        teacher: the MSE-pretrained model, copied and frozen into a FrozenTeacher (use the raw model, not
            its EMA, as the paper does), or a FrozenTeacher used as it is.
        schedule: NoiseSchedule or diffusers scheduler (default NoiseSchedule.scaled_linear(), the
            paper's zero-terminal-SNR v-prediction table, with a one-time warning saying so: pass the
            scheduler your training step uses).
        layers: layers to tap (default: FrozenTeacher's, the midblock of a UNet, a mid-depth block of a
            transformer); layer_weights: one finite weight >= 0 per layer.
        feature_norm: "none" (the paper) or "channel_rms" (see `normalize_features`).
        timesteps_prime: the re-noise timesteps t': a fastperc.TimestepDistribution to draw them from
            (a range, a logit-normal or mode density), or a fixed (B,) tensor; default uniform over the
            table (the paper). A call's own `timesteps_prime=` overrides it.
        prediction_type, reduction, backend, check_values, batch_fraction: as in self_perceptual_loss.
        teacher_dtype: optional dtype for the teacher's weights (e.g. torch.bfloat16).
        teacher_checkpoint: recompute the teacher's activations in backward, one stage at a time
            (see FrozenTeacher's `checkpoint`).
        teacher_fp8: the teacher's Linear layers in FP8, the rest in teacher_dtype or bfloat16 (see
            FrozenTeacher's `fp8`; GPUs of compute capability 8.9 or newer, or the CPU).
        teacher_dtype, teacher_checkpoint and teacher_fp8 build the copy; with a FrozenTeacher, set them on it.

    Call: `criterion(model_output, x0, noise, timesteps, *, timesteps_prime=None, generator=None,
    **teacher_kwargs)`, the conditioning the student got as keyword arguments.

    Example:
        >>> import torch, fastperc
        >>> from fastperc.models import UNet
        >>> student = UNet()
        >>> criterion = fastperc.SelfPerceptualLoss(  # the project's best configuration on its small UNet
        ...     UNet(), fastperc.NoiseSchedule.scaled_linear(rescale_zero_terminal_snr=True),
        ...     layers=("conv_in", "down_blocks.0", "down_blocks.1", "mid_block"), feature_norm="channel_rms",
        ...     timesteps_prime=fastperc.TimestepDistribution(0, 100))
        >>> x0, noise, t = torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32), torch.randint(0, 1000, (2,))
        >>> loss = criterion(student(criterion.schedule.add_noise(x0, noise, t), t), x0, noise, t)
        >>> loss.backward()
    """

    def __init__(self, teacher: nn.Module, schedule: NoiseSchedule | None = None, *,
                 layers: Sequence[str] | None = None, layer_weights: Sequence[float] | None = None,
                 feature_norm: str = "none", timesteps_prime: torch.Tensor | TimestepDistribution | None = None,
                 prediction_type: str | None = None, reduction: str = "mean", backend: str = "auto",
                 teacher_dtype: torch.dtype | None = None, teacher_checkpoint: bool = False,
                 teacher_fp8: bool = False, check_values: bool = False, batch_fraction: float = 1.0):
        super().__init__()
        self.recipe = _Recipe.checked(layer_weights=layer_weights, feature_norm=feature_norm,
                                      timesteps_prime=timesteps_prime, prediction_type=prediction_type,
                                      reduction=reduction, backend=backend, check_values=check_values,
                                      batch_fraction=batch_fraction)
        if isinstance(teacher, FrozenTeacher):
            if layers is not None and tuple(layers) != teacher.layers:
                raise InputError(f"layers: the FrozenTeacher taps {teacher.layers}, got {tuple(layers)}")
            if teacher_dtype is not None or teacher_checkpoint or teacher_fp8:
                raise InputError("teacher_dtype/teacher_checkpoint/teacher_fp8: they build the teacher's copy; a "
                                 "FrozenTeacher is used as it is: pass FrozenTeacher(model, dtype=..., checkpoint=..., "
                                 "fp8=...)")
        else:
            teacher = FrozenTeacher(teacher, layers, dtype=teacher_dtype, checkpoint=teacher_checkpoint,
                                    fp8=teacher_fp8)
        self.teacher = teacher
        if schedule is None:
            _warn_default_schedule()
            schedule = NoiseSchedule.scaled_linear()
        self.schedule = as_schedule(schedule)
        self.schedule.check_prediction_type(prediction_type or self.schedule.prediction_type)
        self.recipe.weights_for(teacher)

    def forward(self, model_output: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
                *, timesteps_prime: torch.Tensor | TimestepDistribution | None = None,
                generator: torch.Generator | None = None, **teacher_kwargs) -> torch.Tensor:
        if timesteps_prime is not None:
            _Recipe.checked(timesteps_prime=timesteps_prime)
        return _objective(self.teacher, self.schedule, self.recipe, model_output, x0, noise, timesteps, timesteps_prime,
                          generator, teacher_kwargs)

    def extra_repr(self) -> str:
        r = self.recipe
        return (f"schedule={self.schedule}, weights={r.layer_weights}, feature_norm={r.feature_norm!r}, "
                f"timesteps_prime={r.timesteps_prime}, reduction={r.reduction!r}, batch_fraction={r.batch_fraction}")
