"""VPSchedule: variance-preserving tables, x_t = sqrt(abar_t) * x0 + sqrt(1 - abar_t) * noise, indexed by
integer timesteps 0..T-1 (DDPM-style). Names follow diffusers (`num_train_timesteps`, `prediction_type`)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from .._per_sample import accumulation_dtype, per_sample
from .._validation import check_choice, check_tensor, check_timesteps
from ..errors import InputError
from .base import NoiseSchedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # of variance-preserving tables
# Of flow-matching tables: the velocity noise - x0 (diffusers' name).
FLOW_PREDICTION_TYPES = ("flow_prediction",)
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


class VPSchedule(NoiseSchedule):
    """A discrete variance-preserving diffusion schedule: alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t).

    Timesteps are integers 0..T-1 (row t of the table, DDPM-style). Its sibling for rectified flow
    (SD3, Flux) is FlowMatchingSchedule. The table is kept in float64 so coefficients are exact to
    float32 output precision; lookups are cached per device.

    Args:
        alphas_cumprod: 1-D tensor of length T with values in [0, 1], non-increasing.
        prediction_type: what the model predicts: "epsilon", "v_prediction" or "sample"
            ("flow_prediction" is refused here: it needs a FlowMatchingSchedule).

    Example:
        >>> import torch, fastperc
        >>> s = fastperc.VPSchedule.scaled_linear()   # the paper's schedule
        >>> x0, eps = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
        >>> x_t = s.add_noise(x0, eps, torch.tensor([10, 999]))
        >>> float(s.alphas_cumprod[-1])   # zero terminal SNR
        0.0
    """

    prediction_types = PREDICTION_TYPES
    sampler = "DDIM"

    def __init__(self, alphas_cumprod: torch.Tensor, prediction_type: str = "v_prediction"):
        check_tensor("alphas_cumprod", alphas_cumprod)
        if alphas_cumprod.dim() != 1 or alphas_cumprod.numel() < 2:
            raise InputError(f"alphas_cumprod: expected a 1-D tensor of length >= 2, got shape {tuple(alphas_cumprod.shape)}")
        ac = alphas_cumprod.detach().to("cpu", torch.float64)
        if not bool(torch.isfinite(ac).all()) or float(ac.min()) < 0 or float(ac.max()) > 1:
            raise InputError("alphas_cumprod: expected finite values in [0, 1]")
        _check_vp_prediction_type(prediction_type)
        self.alphas_cumprod = ac
        # Read once here, on the host: the per-step code never needs a device sync to refuse them.
        self.alpha_zero_timesteps = tuple(int(i) for i in (ac == 0).nonzero().flatten())
        self.sigma_zero_timesteps = tuple(int(i) for i in (ac == 1).nonzero().flatten())
        self._checked: set[str] = set()
        self.prediction_type = prediction_type
        self._tables: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._ranks: dict[torch.device, torch.Tensor] = {}
        self.check_prediction_type(prediction_type)

    # ---- constructors -------------------------------------------------------------------------
    @classmethod
    def from_betas(cls, betas: torch.Tensor, *, rescale_zero_terminal_snr: bool = False,
                   prediction_type: str = "v_prediction") -> "VPSchedule":
        betas = betas.to(torch.float64)
        if rescale_zero_terminal_snr:
            betas = _rescale_zero_terminal_snr(betas)
        return cls(torch.cumprod(1.0 - betas, 0), prediction_type)

    @classmethod
    def scaled_linear(cls, num_train_timesteps: int = 1000, beta_start: float = 0.00085, beta_end: float = 0.012,
                      rescale_zero_terminal_snr: bool = True, prediction_type: str = "v_prediction") -> "VPSchedule":
        """Stable Diffusion's betas (linear in sqrt(beta)); the paper's default with zero terminal SNR."""
        check_T(num_train_timesteps)
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        return cls.from_betas(betas, rescale_zero_terminal_snr=rescale_zero_terminal_snr, prediction_type=prediction_type)

    @classmethod
    def linear(cls, num_train_timesteps: int = 1000, beta_start: float = 0.0001, beta_end: float = 0.02,
               rescale_zero_terminal_snr: bool = False, prediction_type: str = "epsilon") -> "VPSchedule":
        """DDPM's linear betas (Ho et al. 2020)."""
        check_T(num_train_timesteps)
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        return cls.from_betas(betas, rescale_zero_terminal_snr=rescale_zero_terminal_snr, prediction_type=prediction_type)

    @classmethod
    def cosine(cls, num_train_timesteps: int = 1000, max_beta: float = 0.999, rescale_zero_terminal_snr: bool = False,
               prediction_type: str = "v_prediction") -> "VPSchedule":
        """Nichol & Dhariwal's cosine schedule (diffusers' "squaredcos_cap_v2")."""
        check_T(num_train_timesteps)

        def abar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

        T = num_train_timesteps
        betas = torch.tensor([min(1 - abar((i + 1) / T) / abar(i / T), max_beta) for i in range(T)], dtype=torch.float64)
        return cls.from_betas(betas, rescale_zero_terminal_snr=rescale_zero_terminal_snr, prediction_type=prediction_type)

    def check_prediction_type(self, prediction_type: str) -> None:
        """Refuse a prediction type this table cannot convert (a division by zero at some timestep),
        and warn once when a conversion coefficient exceeds RENOISE_COEF_BOUND somewhere in the table.

        "epsilon" needs alpha_t > 0 everywhere (x0 = (x_t - sigma*eps)/alpha): a zero-terminal-SNR table
        has alpha = 0 at its last step, so epsilon is refused for it at build time, not mid-run when a
        batch first draws that step. "sample" needs sigma_t > 0 (eps = (x_t - alpha*x0)/sigma).
        """
        _check_vp_prediction_type(prediction_type)
        if prediction_type in self._checked:
            return
        zero, what, formula = {"epsilon": (self.alpha_zero_timesteps, "alpha", "x0 = (x_t - sigma*eps)/alpha"),
                               "sample": (self.sigma_zero_timesteps, "sigma", "eps = (x_t - alpha*x0)/sigma")
                               }.get(prediction_type, ((), "", ""))
        if zero:
            raise InputError(
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

    def check_timesteps(self, name: str, timesteps, batch: int, device: torch.device, host: bool = True) -> None:
        """Integer timesteps of shape (batch,) in [0, T-1]; host=False checks the range with a
        device-side assert (no sync)."""
        check_timesteps(name, timesteps, batch, self.num_train_timesteps, device, host=host)

    @property
    def timesteps(self) -> torch.Tensor:
        """T-1..0 (int64), as diffusers' DDPMScheduler.timesteps at build."""
        return torch.arange(self.num_train_timesteps - 1, -1, -1)

    def timesteps_by_noise(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """0..T-1 on `device`: integer timestep j is the j-th least noisy entry."""
        device = torch.device(device)
        ranks = self._ranks.get(device)
        if ranks is None:
            ranks = self._ranks[device] = torch.arange(self.num_train_timesteps, device=device)
        return ranks

    def sampling_timesteps(self, steps: int) -> torch.Tensor:
        """diffusers' "trailing" spacing (int64): starts at T-1, so zero-terminal-SNR models see pure
        noise first."""
        T = self.num_train_timesteps
        if isinstance(steps, bool) or not isinstance(steps, int) or not 1 <= steps <= T:
            raise InputError(f"steps: expected an int in 1..{T}, got {steps!r}")
        return torch.from_numpy(np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1)

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

    def velocity(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """The v-prediction target v = alpha_t * noise - sigma_t * x0."""
        a, s = self.alpha_sigma(timesteps, accumulation_dtype(x0.dtype))
        return (per_sample(a, x0) * noise - per_sample(s, x0) * x0).to(x0.dtype)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               prediction_type: str | None = None) -> torch.Tensor:
        """What a model with `prediction_type` should output at x_t (the plain MSE target)."""
        prediction_type = prediction_type or self.prediction_type
        _check_vp_prediction_type(prediction_type)
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

    def __repr__(self) -> str:
        ac = self.alphas_cumprod
        return (f"VPSchedule(T={self.num_train_timesteps}, prediction_type={self.prediction_type!r}, "
                f"abar[0]={float(ac[0]):.6g}, abar[-1]={float(ac[-1]):.6g})")


def _check_vp_prediction_type(prediction_type) -> None:
    """A prediction type of variance-preserving tables; "flow_prediction" gets its own message."""
    if prediction_type in FLOW_PREDICTION_TYPES:
        raise InputError(
            f"prediction_type: {prediction_type!r} needs a flow-matching schedule (NoiseSchedule.flow_matching() or "
            "NoiseSchedule.from_diffusers(FlowMatchEulerDiscreteScheduler(...))), got a variance-preserving table; "
            "on it use 'epsilon', 'v_prediction' or 'sample'")
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)


def check_T(num_train_timesteps) -> None:
    if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
        raise InputError(f"num_train_timesteps: expected an int >= 2, got {num_train_timesteps!r}")
