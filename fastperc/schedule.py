"""Variance-preserving noise schedules: alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t).

The table is kept in float64 so coefficients are exact to float32 output precision; lookups are
cached per device. Names follow diffusers (`num_train_timesteps`, `prediction_type`).
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ._per_sample import accumulation_dtype, per_sample
from ._validation import check_choice, check_like, check_tensor, check_timesteps

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# A conversion coefficient (1/alpha_t for epsilon, 1/sigma_t for sample) above this is warned about
# once, when the table is checked: the re-noised prediction then multiplies the model's error by it.
RENOISE_COEF_BOUND = 100.0


def _rescale_zero_terminal_snr(betas: torch.Tensor) -> torch.Tensor:
    """Lin et al. 2023 ("Common Diffusion Noise Schedules and Sample Steps are Flawed"), Alg. 1."""
    abar_sqrt = torch.cumprod(1.0 - betas, 0).sqrt()
    first, last = abar_sqrt[0].clone(), abar_sqrt[-1].clone()
    abar_sqrt = (abar_sqrt - last) * (first / (first - last))
    abar = abar_sqrt**2
    alphas = torch.cat([abar[:1], abar[1:] / abar[:-1]])
    return 1.0 - alphas


class NoiseSchedule:
    """A discrete variance-preserving diffusion schedule.

    Args:
        alphas_cumprod: 1-D tensor of length T with values in [0, 1], non-increasing.
        prediction_type: what the model predicts: "epsilon", "v_prediction" or "sample".

    Example:
        >>> import torch, fastperc
        >>> s = fastperc.NoiseSchedule.scaled_linear()   # the paper's schedule
        >>> x0, eps = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
        >>> x_t = s.add_noise(x0, eps, torch.tensor([10, 999]))
        >>> float(s.alphas_cumprod[-1])   # zero terminal SNR
        0.0
    """

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "v_prediction"):
        check_tensor("alphas_cumprod", alphas_cumprod)
        if alphas_cumprod.dim() != 1 or alphas_cumprod.numel() < 2:
            raise ValueError(f"alphas_cumprod: expected a 1-D tensor of length >= 2, got shape {tuple(alphas_cumprod.shape)}")
        ac = alphas_cumprod.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(ac).all()) or float(ac.min()) < 0 or float(ac.max()) > 1:
            raise ValueError("alphas_cumprod: expected finite values in [0, 1]")
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        self.alphas_cumprod = ac
        # Read once here, on the host: the per-step code never needs a device sync to refuse them.
        self.alpha_zero_timesteps = tuple(int(i) for i in (ac == 0).nonzero().flatten())
        self.sigma_zero_timesteps = tuple(int(i) for i in (ac == 1).nonzero().flatten())
        self._checked: set[str] = set()
        self.prediction_type = prediction_type
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.check_prediction_type(prediction_type)

    # ---- constructors -------------------------------------------------------------------------
    @classmethod
    def from_betas(cls, betas: torch.Tensor, *, rescale_zero_terminal_snr: bool = False,
                   prediction_type: str = "v_prediction") -> "NoiseSchedule":
        betas = betas.to(torch.float64)
        if rescale_zero_terminal_snr:
            betas = _rescale_zero_terminal_snr(betas)
        return cls(torch.cumprod(1.0 - betas, 0), prediction_type)

    @classmethod
    def scaled_linear(cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                      rescale_zero_terminal_snr: bool = True, prediction_type: str = "v_prediction") -> "NoiseSchedule":
        """Stable Diffusion's betas (linear in sqrt(beta)); the paper's default with zero terminal SNR."""
        _check_T(num_train_timesteps)
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        return cls.from_betas(betas, rescale_zero_terminal_snr=rescale_zero_terminal_snr, prediction_type=prediction_type)

    @classmethod
    def linear(cls, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
               rescale_zero_terminal_snr: bool = False, prediction_type: str = "epsilon") -> "NoiseSchedule":
        """DDPM's linear betas (Ho et al. 2020)."""
        _check_T(num_train_timesteps)
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        return cls.from_betas(betas, rescale_zero_terminal_snr=rescale_zero_terminal_snr, prediction_type=prediction_type)

    @classmethod
    def cosine(cls, num_train_timesteps: int = 1000, max_beta: float = 0.999, rescale_zero_terminal_snr: bool = False,
               prediction_type: str = "v_prediction") -> "NoiseSchedule":
        """Nichol & Dhariwal's cosine schedule (diffusers' "squaredcos_cap_v2")."""
        _check_T(num_train_timesteps)

        def abar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        T = num_train_timesteps
        betas = torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)], dtype=torch.float64)
        return cls.from_betas(betas, rescale_zero_terminal_snr=rescale_zero_terminal_snr, prediction_type=prediction_type)

    @classmethod
    def from_diffusers(cls, scheduler) -> "NoiseSchedule":
        """Read `alphas_cumprod` and `config.prediction_type` from a diffusers scheduler."""
        ac = getattr(scheduler, "alphas_cumprod", None)
        if not isinstance(ac, torch.Tensor):
            raise TypeError(f"scheduler: expected a diffusers scheduler with an `alphas_cumprod` tensor, "
                            f"got {type(scheduler).__name__}")
        config = getattr(scheduler, "config", None)
        prediction_type = getattr(config, "prediction_type", None) or "epsilon"
        return cls(ac, prediction_type)

    def check_prediction_type(self, prediction_type: str) -> None:
        """Refuse a prediction type this table cannot convert (a division by zero at some timestep),
        and warn once when a conversion coefficient exceeds RENOISE_COEF_BOUND somewhere in the table.

        "epsilon" needs alpha_t > 0 everywhere (x0 = (x_t - sigma*eps)/alpha): a zero-terminal-SNR table
        has alpha = 0 at its last step, so epsilon is refused for it at build time, not mid-run when a
        batch first draws that step. "sample" needs sigma_t > 0 (eps = (x_t - alpha*x0)/sigma).
        """
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        if prediction_type in self._checked:
            return
        zero, what, formula = {"epsilon": (self.alpha_zero_timesteps, "alpha", "x0 = (x_t - sigma*eps)/alpha"),
                               "sample": (self.sigma_zero_timesteps, "sigma", "eps = (x_t - alpha*x0)/sigma")
                               }.get(prediction_type, ((), "", ""))
        if zero:
            raise ValueError(
                f"prediction_type: {prediction_type!r} cannot be converted where {what}_t = 0 ({formula} divides by "
                f"zero), got a table with {what}_t = 0 at timesteps {list(zero[:8])}; use 'v_prediction' with a "
                f"zero-terminal-SNR schedule, or a table without those steps")
        if prediction_type in ("epsilon", "sample"):
            ac = self.alphas_cumprod
            c = (1.0 / ac.sqrt()) if prediction_type == "epsilon" else (1.0 / (1.0 - ac).sqrt())
            big = (c > RENOISE_COEF_BOUND).nonzero().flatten()
            if big.numel():
                warnings.warn(
                    f"fastperc: with prediction_type {prediction_type!r} this table's conversion coefficients reach "
                    f"{float(c.max()):.0f} (> {RENOISE_COEF_BOUND:g}) at timesteps {int(big[0])}..{int(big[-1])}: the "
                    "re-noised prediction amplifies the model's error there", RuntimeWarning, stacklevel=3)
        self._checked.add(prediction_type)

    # ---- lookups --------------------------------------------------------------------------------
    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.numel()

    def _table(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        table = self._tables.get(device)
        if table is None:
            ac = self.alphas_cumprod
            table = (ac.sqrt().to(device), (1.0 - ac).sqrt().to(device))
            self._tables[device] = table
        return table

    def alpha_sigma(self, timesteps: torch.Tensor, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample (alpha_t, sigma_t), each of shape timesteps.shape, in `dtype`."""
        alpha, sigma = self._table(timesteps.device)
        t = timesteps.long()
        return alpha[t].to(dtype), sigma[t].to(dtype)

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """x_t = alpha_t * x0 + sigma_t * noise, with one timestep per sample (dim 0)."""
        check_tensor("x0", x0)
        check_like("noise", noise, "x0", x0)
        check_timesteps("timesteps", timesteps, x0.shape[0], self.num_train_timesteps, x0.device)
        return self._add_noise(x0, noise, timesteps)

    def _add_noise(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """add_noise for arguments the caller has already checked (no device sync)."""
        a, s = self.alpha_sigma(timesteps, accumulation_dtype(x0.dtype))
        return (per_sample(a, x0) * x0 + per_sample(s, x0) * noise).to(x0.dtype)

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target v = alpha_t * noise - sigma_t * x0."""
        a, s = self.alpha_sigma(timesteps, accumulation_dtype(x0.dtype))
        return (per_sample(a, x0) * noise - per_sample(s, x0) * x0).to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               prediction_type: str | None = None) -> torch.Tensor:
        """What a model with `prediction_type` should output at x_t (the plain MSE target)."""
        prediction_type = prediction_type or self.prediction_type
        check_choice("prediction_type", prediction_type, PREDICTION_TYPES)
        if prediction_type == "epsilon":
            return noise
        if prediction_type == "sample":
            return x0
        return self.velocity(x0, noise, timesteps)

    # ---- prediction conversions -----------------------------------------------------------------
    def convert_coefficients(self, timesteps: torch.Tensor, prediction_type: str | None = None,
                             dtype: torch.dtype = torch.float32):
        """Per-sample (c_x0, d_x0, c_eps, d_eps) with x0_hat = c_x0*x_t + d_x0*p and eps_hat = c_eps*x_t + d_eps*p.

        Raises ValueError when the table has a step where the conversion divides by zero: "epsilon"
        with alpha_t = 0 (the last step of a zero-terminal-SNR schedule), "sample" with sigma_t = 0.
        """
        prediction_type = prediction_type or self.prediction_type
        self.check_prediction_type(prediction_type)  # from the table, on the host: no device sync
        a, s = self.alpha_sigma(timesteps, torch.float64)
        if prediction_type == "v_prediction":
            c = (a, -s, s, a)
        elif prediction_type == "epsilon":
            c = (1.0 / a, -s / a, torch.zeros_like(a), torch.ones_like(a))
        else:
            c = (torch.zeros_like(a), torch.ones_like(a), 1.0 / s, -a / s)
        return tuple(ci.to(dtype) for ci in c)

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

        Computed in float64 so that t' = t gives exactly a = 1, b = 0 for v-prediction up to rounding.
        """
        c_x0, d_x0, c_eps, d_eps = self.convert_coefficients(timesteps, prediction_type, torch.float64)
        alpha_prime, sigma_prime = self.alpha_sigma(timesteps_prime, torch.float64)
        a = alpha_prime * c_x0 + sigma_prime * c_eps
        b = alpha_prime * d_x0 + sigma_prime * d_eps
        return a.to(dtype), b.to(dtype), alpha_prime.to(dtype), sigma_prime.to(dtype)

    def __repr__(self) -> str:
        ac = self.alphas_cumprod
        return (f"NoiseSchedule(T={self.num_train_timesteps}, prediction_type={self.prediction_type!r}, "
                f"abar[0]={float(ac[0]):.6g}, abar[-1]={float(ac[-1]):.6g})")


def _check_T(num_train_timesteps) -> None:
    if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps: expected an int >= 2, got {num_train_timesteps!r}")


DENSITIES = ("uniform", "logit_normal")


@dataclass(frozen=True)
class TimestepDistribution:
    """How the re-noise timestep t' is drawn: a density over [low, high] of the schedule's table.

    "uniform" is the paper's choice. "logit_normal" draws u = sigmoid(N(loc, scale)) and maps it onto
    [low, high] (loc < 0 favours low-noise t', loc > 0 high-noise; scale sets the spread), the density
    SD3-style training scripts use for t. A range alone ([low, high], uniform) restricts which noise
    levels the teacher compares: low t' shows it nearly clean images, high t' mostly noise.

    Pass one as `timesteps_prime=` to `self_perceptual_loss`.

    Example:
        >>> import torch, fastperc
        >>> dist = fastperc.TimestepDistribution(low=0, high=499, density="logit_normal", loc=-0.5)
        >>> t2 = dist.sample(4, num_train_timesteps=1000, generator=torch.Generator().manual_seed(0))
        >>> bool(((t2 >= 0) & (t2 <= 499)).all())
        True
    """

    low: int = 0
    high: int | None = None  # inclusive; default the last timestep
    density: str = "uniform"
    loc: float = 0.0
    scale: float = 1.0

    def __post_init__(self):
        check_choice("density", self.density, DENSITIES)
        if not isinstance(self.low, int) or self.low < 0:
            raise ValueError(f"low: expected an integer timestep >= 0, got {self.low!r}")
        if self.high is not None and (not isinstance(self.high, int) or self.high < self.low):
            raise ValueError(f"high: expected an integer timestep >= low ({self.low}) or None, got {self.high!r}")
        if not (math.isfinite(self.loc) and math.isfinite(self.scale) and self.scale > 0):
            raise ValueError(f"loc/scale: expected finite values with scale > 0, got {self.loc!r}/{self.scale!r}")

    def bounds(self, num_train_timesteps: int) -> tuple[int, int]:
        high = num_train_timesteps - 1 if self.high is None else self.high
        if high >= num_train_timesteps:
            raise ValueError(f"high: expected a timestep below num_train_timesteps = {num_train_timesteps}, got {high}")
        return self.low, high

    def sample(self, batch: int, num_train_timesteps: int, generator: torch.Generator | None = None,
               device: torch.device | str | None = None) -> torch.Tensor:
        """(batch,) integer timesteps (drawn on the generator's device, returned on `device`)."""
        low, high = self.bounds(num_train_timesteps)
        gen_device = generator.device if generator is not None else device
        if self.density == "uniform":
            t = torch.randint(low, high + 1, (batch,), generator=generator, device=gen_device)
        else:
            u = torch.sigmoid(torch.randn(batch, generator=generator, device=gen_device) * self.scale + self.loc)
            t = (low + (u * (high - low + 1)).long()).clamp_(low, high)
        return t.to(device) if device is not None else t
