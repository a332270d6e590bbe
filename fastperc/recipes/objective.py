"""The parts of a training step that `fastperc train` and `fastperc finetune` share: the objective on
a micro-batch (MSE, or the self-perceptual objective on its first k samples), which samples get the teacher
and how their t is drawn, the learning rate over the run, the EMA update, and the per-step seed. Each
takes the run's options (a TrainConfig or a FinetuneConfig: the same fields, defined once in config.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import InputError
from ..loss import self_perceptual_loss, teacher_batch
from ..schedule import NoiseSchedule, TimestepDistribution


def objective_loss(cfg, teacher, schedule, pred, x0, noise, t, t_prime, teacher_kwargs: dict | None,
                   k: int) -> torch.Tensor:
    """The step's loss on one micro-batch: MSE, or the self-perceptual objective on its first k samples
    (the teacher's static share: `sp_fraction`, or the samples drawn inside `objective_t_range`) and MSE
    on the rest, averaged over the micro-batch; plus `mse_weight` times the MSE."""
    target = schedule.target(x0, noise, t, schedule.prediction_type)
    if cfg.objective == "mse":
        return F.mse_loss(pred, target)
    if k == 0:  # a band outside the table: every sample gets MSE
        loss = F.mse_loss(pred, target)
    else:
        loss = self_perceptual_loss(teacher, pred, x0, noise, t, schedule, layer_weights=cfg.layer_weights,
                                    teacher_kwargs=teacher_kwargs or {}, timesteps_prime=t_prime, feature_norm=cfg.feature_norm,
                                    batch_fraction=k / pred.shape[0])
    if cfg.mse_weight > 0:
        loss = loss + cfg.mse_weight * F.mse_loss(pred, target)
    return loss


@dataclass(frozen=True)
class TimestepStrata:
    """Which samples of a micro-batch get the teacher, and how their t is drawn. In each micro-batch of
    `micro` samples the first `k` get the self-perceptual objective and the rest plain MSE (static
    shapes). With `objective_t_range` the first k are drawn from the table entries inside the band and
    the others from the rest, k = round(micro * the band's share of the table); without it t is uniform
    over the table (or drawn from `density`: diffusers' logit-normal or mode density for flow matching)
    and k is the `sp_fraction` share of the micro-batch."""
    micro: int
    k: int
    values: torch.Tensor                 # the table's timesteps by index, on the device (ints, or sigma * T)
    inside: torch.Tensor | None = None   # indices of the entries in the band (on the device)
    outside: torch.Tensor | None = None  # ... and of the others
    density: TimestepDistribution | None = None  # a density over the table's entries ranked by noise; None uniform

    @classmethod
    def of(cls, cfg, schedule: NoiseSchedule, micro: int, device: torch.device,
           density: TimestepDistribution | None = None) -> "TimestepStrata":
        # diffusers' training scripts draw a flow table's float timesteps, a VP table's indices
        values = schedule.timesteps_by_noise()
        if cfg.objective != "self_perceptual":
            return cls(micro, 0, values.to(device), density=density)
        if cfg.objective_t_range is None:
            return cls(micro, teacher_batch(micro, cfg.sp_fraction), values.to(device), density=density)
        if density is not None:
            raise InputError(f"objective_t_range: t is drawn uniformly inside and outside the band; expected no "
                             f"--objective-t-range with the {density.density} density of t (or --t-density uniform)")
        low, high = cfg.objective_t_range
        band = (values >= low) & (values <= high)
        share = float(band.float().mean())
        k = round(micro * share)
        if 0 < share < 1 and k in (0, micro):  # t on one side of the band would never be drawn
            raise InputError(f"objective_t_range: the band [{low}, {high}] holds {share:.1%} of the table, so a "
                             f"micro-batch of {micro} samples gets {k} in it and t "
                             f"{'inside' if k == 0 else 'outside'} the band would never be drawn; use a wider or "
                             "narrower band or a larger micro-batch (--batch-size / processes / --grad-accum)")
        return cls(micro, k, values.to(device), band.nonzero()[:, 0].to(device), (~band).nonzero()[:, 0].to(device))

    def draw(self, batch: int, generator: torch.Generator) -> torch.Tensor:
        """(batch,) timesteps for the global batch (every micro-batch laid out alike)."""
        device = self.values.device
        n = len(self.values)
        if self.density is not None:  # ranks by noise level, as TimestepDistribution draws them
            return self.values[self.density.sample(batch, num_train_timesteps=n, generator=generator)]
        if self.inside is None or not len(self.inside) or not len(self.outside):  # no band, or all or nothing
            pool = None if self.inside is None else self.inside if len(self.inside) else self.outside
            i = torch.randint(0, len(pool) if pool is not None else n, (batch,), generator=generator, device=device)
            return self.values[i if pool is None else pool[i]]
        inside = self.inside[torch.randint(0, len(self.inside), (batch,), generator=generator, device=device)]
        outside = self.outside[torch.randint(0, len(self.outside), (batch,), generator=generator, device=device)]
        return self.values[torch.where(torch.arange(batch, device=device) % self.micro < self.k, inside, outside)]


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, apply: torch.Tensor | None = None) -> None:
    """ema += (1 - decay) * (model - ema) over every parameter, the buffers copied. `apply`, a 0-d device
    tensor (1 or 0), gates the update without a host sync: a skipped (non-finite) step leaves the EMA as it
    was."""
    ema_tensors_update(list(ema.parameters()), list(model.parameters()), decay, apply)
    for eb, b in zip(ema.buffers(), model.buffers()):
        eb.copy_(b)


@torch.no_grad()
def ema_tensors_update(ema_p: list[torch.Tensor], p: list[torch.Tensor], decay: float,
                       apply: torch.Tensor | None = None) -> None:
    """The EMA step of `ema_update` over matching lists of tensors (e.g. only a LoRA student's weights)."""
    if apply is None:
        torch._foreach_lerp_(ema_p, p, 1.0 - decay)
    else:
        delta = torch._foreach_sub(p, ema_p)
        torch._foreach_mul_(delta, apply.to(ema_p[0].dtype) * (1.0 - decay))
        torch._foreach_add_(ema_p, delta)


def warmup_length(cfg) -> int:
    """The warm-up in optimizer steps, capped at a fifth of the run: a short run must leave it."""
    return max(1, min(int(cfg.warmup_steps), cfg.max_steps // 5))


def lr_factor(cfg, good_steps: torch.Tensor, warmup: int) -> torch.Tensor:
    """The learning rate's share of `cfg.lr` after `good_steps` good (applied) steps, on the device (no host
    sync): a linear warm-up over `warmup` steps, then constant or, with lr_schedule="cosine", a cosine
    decay to 0 at max_steps."""
    n = (good_steps + 1).double()
    factor = torch.clamp(n / warmup, max=1.0)
    if cfg.lr_schedule == "cosine":
        progress = torch.clamp((n - warmup) / max(1, cfg.max_steps - warmup), min=0.0, max=1.0)
        factor = factor * 0.5 * (1.0 + torch.cos(torch.pi * progress))
    return factor


def seed_for(seed: int, step: int) -> int:
    """Every draw of a step comes from (seed, step): a resumed run repeats the uninterrupted one."""
    return seed * 1_000_003 + step
