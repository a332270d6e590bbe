"""TimestepDistribution: how the re-noise timestep t' is drawn (a density over a schedule's table)."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .._validation import check_choice
from ..errors import InputError
from .base import NoiseSchedule

DENSITIES = ("uniform", "logit_normal", "mode")
# f_mode(u) = 1 - u - s (cos^2(pi u / 2) - 1 + u) is a bijection of [0, 1] for s in this range (SD3 paper, sec. 3.1).
MODE_SCALE_RANGE = (-1.0, 2.0 / (math.pi - 2.0))


@dataclass(frozen=True)
class TimestepDistribution:
    """How the re-noise timestep t' is drawn: a density over the entries [low, high] of the schedule's table.

    Entries are ranked by noise level: rank j is integer timestep j of a DDPM-style table, and the
    j-th least noisy entry of a flow-matching table (whose draw is that entry's float timestep
    sigma * T, a value of diffusers' `scheduler.timesteps`). A draw is rank = low + floor(u * n) over the
    n = high - low + 1 entries, with u in [0, 1) from the density (u near 0: low noise):

    - "uniform" (the default, the paper's choice): uniform over the entries.
    - "logit_normal": u = sigmoid(N(loc, scale)) (loc < 0 favours low-noise t', loc > 0 high-noise;
      scale sets the spread), the density SD3-style training scripts use for t.
    - "mode": u = 1 - v - mode_scale * (cos^2(pi v / 2) - 1 + v), v uniform: SD3's mode density
      (diffusers' weighting_scheme="mode", default mode_scale 1.29), which for mode_scale > 0 favours
      the middle of the table. mode_scale must lie in [-1, 2 / (pi - 2)] (so the map is a bijection).

    Both densities are those of diffusers' compute_density_for_timestep_sampling with u read as the
    noise level, as in the SD3 paper (diffusers' scripts index the noisiest-first table with u; for
    loc = 0 the two readings give the same distribution, since both densities are then symmetric).

    A range alone ([low, high], uniform) restricts which noise levels the teacher compares: low t'
    shows it nearly clean images, high t' mostly noise.

    Pass one as `timesteps_prime=` to `self_perceptual_loss`, or draw with `sample`.

    Example:
        >>> import torch, fastperc
        >>> dist = fastperc.TimestepDistribution(low=0, high=499, density="logit_normal", loc=-0.5)
        >>> t2 = dist.sample(4, num_train_timesteps=1000, generator=torch.Generator().manual_seed(0))
        >>> bool(((t2 >= 0) & (t2 <= 499)).all())
        True
        >>> flow = fastperc.NoiseSchedule.flow_matching(shift=3.0)   # float timesteps from the table
        >>> t2 = fastperc.TimestepDistribution(density="mode").sample(4, schedule=flow)
        >>> t2.dtype, bool(torch.isin(t2, flow.timesteps).all())
        (torch.float32, True)
    """

    low: int = 0
    high: int | None = None  # inclusive; default the last timestep
    density: str = "uniform"
    loc: float = 0.0
    scale: float = 1.0
    mode_scale: float = 1.29

    def __post_init__(self):
        check_choice("density", self.density, DENSITIES)
        if not isinstance(self.low, int) or self.low < 0:
            raise InputError(f"low: expected an integer timestep >= 0, got {self.low!r}")
        if self.high is not None and (not isinstance(self.high, int) or self.high < self.low):
            raise InputError(f"high: expected an integer timestep >= low ({self.low}) or None, got {self.high!r}")
        if not (math.isfinite(self.loc) and math.isfinite(self.scale) and self.scale > 0):
            raise InputError(f"loc/scale: expected finite values with scale > 0, got {self.loc!r}/{self.scale!r}")
        lo, hi = MODE_SCALE_RANGE
        if not (isinstance(self.mode_scale, (int, float)) and lo <= self.mode_scale <= hi):
            raise InputError(f"mode_scale: expected a number in [{lo:g}, {hi:.4f}] (2 / (pi - 2)), "
                             f"got {self.mode_scale!r}")

    def bounds(self, num_train_timesteps: int) -> tuple[int, int]:
        high = num_train_timesteps - 1 if self.high is None else self.high
        if high >= num_train_timesteps:
            raise InputError(f"high: expected a timestep below num_train_timesteps = {num_train_timesteps}, got {high}")
        return self.low, high

    def sample(self, batch: int, num_train_timesteps: int | None = None, generator: torch.Generator | None = None,
               device: torch.device | str | None = None, schedule: NoiseSchedule | None = None) -> torch.Tensor:
        """(batch,) timesteps, drawn on the generator's device and returned on `device`: integers
        0..T-1, or with a FlowMatchingSchedule as `schedule` the table's float timesteps sigma * T
        (float32, values of diffusers' `scheduler.timesteps`). No host sync.

        num_train_timesteps may be left out when `schedule` is given (it must agree if both are)."""
        if schedule is not None:
            if num_train_timesteps is not None and num_train_timesteps != schedule.num_train_timesteps:
                raise InputError(f"num_train_timesteps: expected {schedule.num_train_timesteps} (the schedule's), "
                                 f"got {num_train_timesteps}")
            num_train_timesteps = schedule.num_train_timesteps
        if num_train_timesteps is None:
            raise TypeError("num_train_timesteps: expected an int, or pass schedule=")
        low, high = self.bounds(num_train_timesteps)
        gen_device = generator.device if generator is not None else device
        if self.density == "uniform":
            t = torch.randint(low, high + 1, (batch,), generator=generator, device=gen_device)
        else:
            if self.density == "logit_normal":
                u = torch.sigmoid(torch.randn(batch, generator=generator, device=gen_device) * self.scale + self.loc)
            else:
                v = torch.rand(batch, generator=generator, device=gen_device)
                u = 1 - v - self.mode_scale * (torch.cos(math.pi * v / 2) ** 2 - 1 + v)
            t = (low + (u * (high - low + 1)).long()).clamp_(low, high)
        if schedule is not None:  # a rank: the table's entry of that noise level (an integer for a VP table)
            t = schedule.timesteps_by_noise(t.device)[t]
        return t.to(device) if device is not None else t
