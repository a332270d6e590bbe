"""NoiseSchedule: what every fastperc schedule answers, x_t = alpha_t * x0 + sigma_t * noise.

Two siblings implement it: VPSchedule (variance-preserving tables, integer timesteps) and
FlowMatchingSchedule (rectified flow, float timesteps sigma * T). Callers use only the methods below,
never the class: `isinstance(s, NoiseSchedule)` means "a fastperc schedule of either kind".
"""
from __future__ import annotations

import warnings
from abc import ABC, abstractmethod

import torch

from .._per_sample import accumulation_dtype, per_sample
from .._validation import check_like, check_tensor


class NoiseSchedule(ABC):
    """The schedule protocol: noising, targets, conversions, re-noise coefficients, the timestep table
    and what samplers need. Build one with a constructor below; each returns a VPSchedule or a
    FlowMatchingSchedule:

    - `NoiseSchedule.scaled_linear()` (the paper's), `.linear()`, `.cosine()`, `.from_betas(betas)`:
      variance-preserving tables (VPSchedule);
    - `NoiseSchedule.flow_matching(shift=...)`: rectified flow (FlowMatchingSchedule);
    - `NoiseSchedule.from_diffusers(scheduler)`: either, read from a diffusers scheduler.

    `NoiseSchedule(alphas_cumprod, prediction_type)` still builds a VPSchedule, with a
    DeprecationWarning (the variance-preserving class was called NoiseSchedule before; use VPSchedule).

    Example:
        >>> import torch, fastperc
        >>> s = fastperc.NoiseSchedule.scaled_linear()
        >>> isinstance(s, fastperc.NoiseSchedule), type(s).__name__
        (True, 'VPSchedule')
        >>> x0, eps, t = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8), torch.tensor([10, 999])
        >>> x0_hat, eps_hat = s.convert(s.add_noise(x0, eps, t), s.target(x0, eps, t), t)
        >>> torch.allclose(x0_hat, x0, atol=1e-4)
        True
    """

    prediction_type: str
    #: The prediction types this kind of schedule converts.
    prediction_types: tuple[str, ...] = ()
    #: What `sampler_step` is, for reports.
    sampler: str = ""

    def __new__(cls, *args, **kwargs):
        if cls is NoiseSchedule:  # the old name of the variance-preserving class
            from .variance_preserving import VPSchedule
            warnings.warn("fastperc: NoiseSchedule(alphas_cumprod, ...) is deprecated and will be removed in the "
                          "next release; use VPSchedule(alphas_cumprod, ...) or a constructor such as "
                          "NoiseSchedule.scaled_linear()", DeprecationWarning, stacklevel=2)
            cls = VPSchedule
        return super().__new__(cls)

    # ---- constructors (each returns a concrete schedule) ----------------------------------------
    @staticmethod
    def from_betas(betas: torch.Tensor, *, rescale_zero_terminal_snr: bool = False,
                   prediction_type: str = "v_prediction"):
        """A VPSchedule from a beta table; see VPSchedule.from_betas."""
        from .variance_preserving import VPSchedule
        return VPSchedule.from_betas(betas, rescale_zero_terminal_snr=rescale_zero_terminal_snr,
                                     prediction_type=prediction_type)

    @staticmethod
    def scaled_linear(num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                      rescale_zero_terminal_snr: bool = True, prediction_type: str = "v_prediction"):
        """Stable Diffusion's betas with zero terminal SNR (the paper's default): a VPSchedule."""
        from .variance_preserving import VPSchedule
        return VPSchedule.scaled_linear(num_train_timesteps, beta_start, beta_end, rescale_zero_terminal_snr,
                                        prediction_type)

    @staticmethod
    def linear(num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
               rescale_zero_terminal_snr: bool = False, prediction_type: str = "epsilon"):
        """DDPM's linear betas (Ho et al. 2020): a VPSchedule."""
        from .variance_preserving import VPSchedule
        return VPSchedule.linear(num_train_timesteps, beta_start, beta_end, rescale_zero_terminal_snr,
                                 prediction_type)

    @staticmethod
    def cosine(num_train_timesteps: int = 1000, max_beta: float = 0.999, rescale_zero_terminal_snr: bool = False,
               prediction_type: str = "v_prediction"):
        """Nichol & Dhariwal's cosine schedule (diffusers' "squaredcos_cap_v2"): a VPSchedule."""
        from .variance_preserving import VPSchedule
        return VPSchedule.cosine(num_train_timesteps, max_beta, rescale_zero_terminal_snr, prediction_type)

    @staticmethod
    def flow_matching(num_train_timesteps: int = 1000, shift: float = 1.0, prediction_type: str = "flow_prediction"):
        """Rectified flow as diffusers trains it (SD3, Flux): a FlowMatchingSchedule."""
        from .flow_matching import FlowMatchingSchedule
        return FlowMatchingSchedule(num_train_timesteps, shift, prediction_type)

    @staticmethod
    def from_diffusers(scheduler) -> "NoiseSchedule":
        """The schedule a diffusers scheduler trains with: a FlowMatchingSchedule for a flow-matching
        scheduler (FlowMatchEulerDiscreteScheduler, ...), else a VPSchedule from its `alphas_cumprod`
        and `config.prediction_type`."""
        from .diffusers_schedulers import from_diffusers
        return from_diffusers(scheduler)

    # ---- the table ------------------------------------------------------------------------------
    @property
    @abstractmethod
    def num_train_timesteps(self) -> int:
        """T, the length of the training table."""

    @property
    @abstractmethod
    def timesteps(self) -> torch.Tensor:
        """The training table's timesteps, noisiest first (diffusers' `scheduler.timesteps` at build):
        integers T-1..0, or floats sigma * T."""

    @abstractmethod
    def timesteps_by_noise(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The table's timesteps in order of increasing noise (entry j: the j-th least noisy), on
        `device` (cached per device). Rank-based draws (TimestepDistribution) index this."""

    @abstractmethod
    def check_timesteps(self, name: str, timesteps, batch: int, device: torch.device, host: bool = True) -> None:
        """Refuse timesteps this table cannot take, naming `name`; host=False checks value ranges with a
        device-side assert (no host sync)."""

    @abstractmethod
    def check_prediction_type(self, prediction_type: str) -> None:
        """Refuse a prediction type this schedule cannot convert (naming prediction_type)."""

    @abstractmethod
    def alpha_sigma(self, timesteps: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (alpha_t, sigma_t), each of shape timesteps.shape, in `dtype`."""

    # ---- noising and targets --------------------------------------------------------------------
    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, *,
                  check: bool = True) -> torch.Tensor:
        """x_t = alpha_t * x0 + sigma_t * noise, with one timestep per sample (dim 0). check=False skips
        the argument checks (for callers that checked them already: no host sync at all)."""
        if check:
            check_tensor("x0", x0)
            check_like("noise", noise, "x0", x0)
            self.check_timesteps("timesteps", timesteps, x0.shape[0], x0.device)
        a, s = self.alpha_sigma(timesteps, accumulation_dtype(x0.dtype))
        return (per_sample(a, x0) * x0 + per_sample(s, x0) * noise).to(x0.dtype)

    @abstractmethod
    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               prediction_type: str | None = None) -> torch.Tensor:
        """What a model with `prediction_type` should output at x_t (the plain MSE target)."""

    # ---- conversions ----------------------------------------------------------------------------
    @abstractmethod
    def convert_coefficients(self, timesteps: torch.Tensor, prediction_type: str | None = None,
                             dtype: torch.dtype = torch.float32):
        """Per-sample (c_x0, d_x0, c_eps, d_eps) with x0_hat = c_x0*x_t + d_x0*p and eps_hat = c_eps*x_t + d_eps*p."""

    def convert(self, x_t: torch.Tensor, model_output: torch.Tensor, timesteps: torch.Tensor,
                prediction_type: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x0_hat, eps_hat) implied by a model prediction at x_t."""
        c_x0, d_x0, c_eps, d_eps = (per_sample(c, x_t) for c in
                                    self.convert_coefficients(timesteps, prediction_type, accumulation_dtype(x_t.dtype)))
        return (c_x0 * x_t + d_x0 * model_output).to(x_t.dtype), (c_eps * x_t + d_eps * model_output).to(x_t.dtype)

    def renoise_coefficients(self, timesteps: torch.Tensor, timesteps_prime: torch.Tensor,
                             prediction_type: str | None = None, dtype: torch.dtype = torch.float32):
        """Per-sample (a, b, alpha', sigma') such that, re-noised to t',

            fake = alpha' * x0_hat + sigma' * eps_hat = a * x_t + b * model_output
            real = alpha' * x0     + sigma' * noise

        Computed in float64, so t' = t gives a = 1, b = 0 up to rounding."""
        c_x0, d_x0, c_eps, d_eps = self.convert_coefficients(timesteps, prediction_type, torch.float64)
        alpha_prime, sigma_prime = self.alpha_sigma(timesteps_prime, torch.float64)
        a = alpha_prime * c_x0 + sigma_prime * c_eps
        b = alpha_prime * d_x0 + sigma_prime * d_eps
        return a.to(dtype), b.to(dtype), alpha_prime.to(dtype), sigma_prime.to(dtype)

    # ---- sampling -------------------------------------------------------------------------------
    @abstractmethod
    def sampling_timesteps(self, steps: int) -> torch.Tensor:
        """The (steps,) timesteps a deterministic sampler visits, noisiest first (DDIM's "trailing"
        spacing for a VP table; diffusers' FlowMatchEulerDiscreteScheduler.set_timesteps for flow)."""

    def sampler_step(self, x_t: torch.Tensor, model_output: torch.Tensor, timesteps: torch.Tensor,
                     timesteps_next: torch.Tensor | None) -> torch.Tensor:
        """One deterministic step from t to t_next: x = alpha_next * x0_hat + sigma_next * eps_hat (DDIM with
        eta = 0 for a VP table, an Euler step for flow matching); timesteps_next None gives x0_hat."""
        x0_hat, eps_hat = self.convert(x_t, model_output, timesteps)
        if timesteps_next is None:
            return x0_hat
        a, s = self.alpha_sigma(timesteps_next, accumulation_dtype(x_t.dtype))
        return (per_sample(a, x_t) * x0_hat + per_sample(s, x_t) * eps_hat).to(x_t.dtype)
