"""FlowMatchingSchedule: rectified flow as diffusers trains it, x_t = (1 - sigma) x0 + sigma noise,
indexed by float timesteps sigma * T (the sibling of VPSchedule)."""
from __future__ import annotations

import math

import numpy as np
import torch

from .._validation import check_choice, check_float_timesteps
from ..errors import InputError
from .base import NoiseSchedule
from .diffusers_schedulers import is_diffusers_flow_scheduler
from .variance_preserving import FLOW_PREDICTION_TYPES, PREDICTION_TYPES, check_T


class FlowMatchingSchedule(NoiseSchedule):
    """Rectified flow as diffusers trains it (FlowMatchEulerDiscreteScheduler: SD3, Flux).

        x_t = (1 - s) * x0 + s * noise         (alpha = 1 - s, sigma = s, s in [0, 1])
        target = noise - x0                    (prediction_type "flow_prediction", diffusers' name)

    The training table, built as diffusers' __init__ builds it (the same float32 operations, so
    `timesteps` equals `scheduler.timesteps` bit for bit): for k = 0..T-1, u = (T - k) / T,
    sigma_k = shift * u / (1 + (shift - 1) * u), timesteps_k = sigma_k * T, noisiest first.

    Timesteps are floats sigma * T, what `scheduler.timesteps[indices]` gives in diffusers' training
    scripts (integer tensors are refused: an integer is most likely an index into that table). Sigma is
    read as s = t / T, in float64: no table search and no host sync. That is the table's own sigma since
    its timesteps are sigma * T (diffusers' float32 sigmas agree to about 1e-7); any float in [0, T] is
    accepted (continuous time). `sigmas` holds timesteps / T for the table's entries.

    Conversions (no division anywhere, so every t in [0, T] converts and nothing is refused):

        x0_hat = x_t - s * v,    eps_hat = x_t + (1 - s) * v

    Re-noised to s': fake = (1 - s') x0_hat + s' eps_hat = x_t + (s' - s) v, i.e. renoise coefficients
    (a, b, alpha', sigma') = (1, s' - s, 1 - s', s'): one Euler step of FlowMatchEulerDiscreteScheduler
    from s to s', and t' = t gives fake = x_t exactly.

    Only "flow_prediction" is accepted: "epsilon", "v_prediction" (the VP velocity) and "sample" are
    refused with a ValueError naming prediction_type when the schedule or the loss is built (epsilon
    would divide by 1 - s = 0 at the table's first entry; convert such models' outputs to noise - x0).

    Args:
        num_train_timesteps: T (int >= 2), as diffusers' `num_train_timesteps`.
        shift: diffusers' `shift` (> 0; 3.0 for SD3); 1.0 is the plain linear table.
        prediction_type: "flow_prediction".

    Example:
        >>> import torch, fastperc
        >>> s = fastperc.NoiseSchedule.flow_matching(shift=3.0)
        >>> t = s.timesteps[torch.tensor([0, 500, 999])]   # as scheduler.timesteps[indices]
        >>> x0, eps = torch.randn(3, 1, 8, 8), torch.randn(3, 1, 8, 8)
        >>> x_t = s.add_noise(x0, eps, t)                  # (1 - sigma) x0 + sigma eps
        >>> x0_hat, eps_hat = s.convert(x_t, s.target(x0, eps, t), t)
        >>> torch.allclose(x0_hat, x0, atol=1e-5) and torch.allclose(eps_hat, eps, atol=1e-5)
        True
        >>> [round(float(x), 4) for x in s.sigmas[[0, -1]]]
        [1.0, 0.003]
    """

    prediction_types = FLOW_PREDICTION_TYPES
    sampler = "Euler"

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, prediction_type: str = "flow_prediction"):
        check_T(num_train_timesteps)
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
            raise InputError(f"shift: expected a finite number > 0, got {shift!r}")
        T = num_train_timesteps
        self._num_train_timesteps = T
        self.shift = float(shift)
        # diffusers' operations in diffusers' dtype: the float timesteps users pass are these values.
        u = torch.arange(T, 0, -1, dtype=torch.float32) / T
        u = self.shift * u / (1 + (self.shift - 1) * u)
        self._timesteps = u * T
        self.sigmas = self._timesteps.double() / T  # what the lookups give for the table's timesteps
        self._checked: set[str] = set()
        self._tables: dict = {}
        self.prediction_type = prediction_type
        self.check_prediction_type(prediction_type)

    @classmethod
    def from_diffusers(cls, scheduler) -> "FlowMatchingSchedule":
        """The training table of a diffusers flow-matching scheduler, read from its config
        (num_train_timesteps, shift; unshifted when `use_dynamic_shifting`, as diffusers' __init__
        builds it), not from `scheduler.sigmas`, which `set_timesteps` replaces by an inference table.

        Example:
            >>> import fastperc
            >>> from diffusers import FlowMatchEulerDiscreteScheduler
            >>> sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
            >>> sched.set_timesteps(20)                     # a pipeline was run with it
            >>> s = fastperc.NoiseSchedule.from_diffusers(sched)
            >>> s.num_train_timesteps, s.shift, s.prediction_type
            (1000, 3.0, 'flow_prediction')
        """
        if not is_diffusers_flow_scheduler(scheduler):
            raise TypeError(f"scheduler: expected a diffusers flow-matching scheduler "
                            f"(FlowMatchEulerDiscreteScheduler), got {type(scheduler).__name__}")
        config = scheduler.config
        shift = 1.0 if getattr(config, "use_dynamic_shifting", False) else config.shift
        prediction_type = getattr(config, "prediction_type", None) or "flow_prediction"
        return cls(int(config.num_train_timesteps), float(shift), prediction_type)

    @property
    def num_train_timesteps(self) -> int:
        return self._num_train_timesteps

    def check_prediction_type(self, prediction_type: str) -> None:
        """Accept "flow_prediction" only (see the class docstring)."""
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES + FLOW_PREDICTION_TYPES)
        if prediction_type not in FLOW_PREDICTION_TYPES:
            raise InputError(
                f"prediction_type: a flow-matching schedule (x_t = (1 - sigma) x0 + sigma noise) takes "
                f"'flow_prediction' (the model predicts noise - x0, as diffusers trains SD3 and Flux), got "
                f"{prediction_type!r}; for {prediction_type!r} use a variance-preserving NoiseSchedule")

    def check_timesteps(self, name: str, timesteps, batch: int, device: torch.device, host: bool = True) -> None:
        """Float timesteps sigma * T of shape (batch,) in [0, T]; integer tensors are refused."""
        check_float_timesteps(name, timesteps, batch, self.num_train_timesteps, device, host=host)

    def _sigma(self, timesteps: torch.Tensor) -> torch.Tensor:
        return timesteps.to(torch.float64) / self.num_train_timesteps

    def alpha_sigma(self, timesteps: torch.Tensor,
                    dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (1 - sigma, sigma) with sigma = timesteps / T, in `dtype`."""
        s = self._sigma(timesteps)
        return (1.0 - s).to(dtype), s.to(dtype)

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """The flow velocity d x_t / d sigma = noise - x0 (the same at every timestep)."""
        return noise - x0

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor | None = None,
               prediction_type: str | None = None) -> torch.Tensor:
        """The plain MSE target of a flow-matching model: noise - x0."""
        self.check_prediction_type(prediction_type or self.prediction_type)
        return noise - x0

    def convert_coefficients(self, timesteps: torch.Tensor, prediction_type: str | None = None,
                             dtype: torch.dtype = torch.float32):
        """Per-sample (c_x0, d_x0, c_eps, d_eps) = (1, -s, 1, 1 - s): x0_hat = x_t - s v, eps_hat = x_t + (1 - s) v."""
        self.check_prediction_type(prediction_type or self.prediction_type)
        s = self._sigma(timesteps)
        one = torch.ones_like(s)
        return tuple(c.to(dtype) for c in (one, -s, one, 1.0 - s))

    def renoise_coefficients(self, timesteps: torch.Tensor, timesteps_prime: torch.Tensor,
                             prediction_type: str | None = None, dtype: torch.dtype = torch.float32):
        """Per-sample (a, b, alpha', sigma') = (1, s' - s, 1 - s', s'): fake = x_t + (s' - s) * v (an Euler
        step from s to s'), real = (1 - s') x0 + s' noise. b is one float64 subtraction, so t' = t gives
        b = 0 and fake = x_t exactly."""
        self.check_prediction_type(prediction_type or self.prediction_type)
        s, s2 = self._sigma(timesteps), self._sigma(timesteps_prime)
        return torch.ones_like(s2).to(dtype), (s2 - s).to(dtype), (1.0 - s2).to(dtype), s2.to(dtype)

    @property
    def timesteps(self) -> torch.Tensor:
        """The table's float32 timesteps sigma * T, noisiest first (diffusers' `scheduler.timesteps` at build)."""
        return self._timesteps

    def timesteps_by_noise(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The table's timesteps in order of increasing noise (entry j: the j-th least noisy), on `device`."""
        device = torch.device(device)
        table = self._tables.get(device)
        if table is None:
            table = self._tables[device] = self._timesteps.flip(0).to(device)
        return table

    def sigmas_for_sampling(self, steps: int) -> list[float]:
        """diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps (without dynamic shifting): `steps`
        values evenly spaced from the table's largest to its smallest sigma, each then shifted (diffusers
        shifts these already-shifted end points once more), then 0."""
        T = self.num_train_timesteps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
            raise InputError(f"steps: expected an int in 1..{T}, got {steps!r}")
        u = np.linspace(float(self.sigmas.max()), float(self.sigmas.min()), steps)
        k = self.shift
        return [float(k * v / (1 + (k - 1) * v)) for v in u] + [0.0]

    def sampling_timesteps(self, steps: int) -> torch.Tensor:
        """The (steps,) float32 timesteps sigma * T of `sigmas_for_sampling(steps)` (the final 0 is the
        sampler's clean end, not a model call)."""
        return torch.tensor(self.sigmas_for_sampling(steps)[:-1], dtype=torch.float64).mul(
            self.num_train_timesteps).float()

    def __repr__(self) -> str:
        return (f"FlowMatchingSchedule(T={self.num_train_timesteps}, shift={self.shift:g}, "
                f"prediction_type={self.prediction_type!r})")
