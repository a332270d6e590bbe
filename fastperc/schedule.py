"""Noise schedules: x_t = alpha_t * x0 + sigma_t * noise.

NoiseSchedule: variance-preserving tables, alpha_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t), indexed
by integer timesteps 0..T-1 (DDPM-style). FlowMatchingSchedule: rectified flow as diffusers trains it
(FlowMatchEulerDiscreteScheduler), alpha = 1 - sigma, indexed by float timesteps sigma * T.

The table is kept in float64 so coefficients are exact to float32 output precision; lookups are
cached per device. Names follow diffusers (`num_train_timesteps`, `prediction_type`).
"""
from __future__ import annotations

from .errors import InputError

import math
import warnings
from dataclasses import dataclass

import torch

from ._per_sample import accumulation_dtype, per_sample
from ._validation import check_choice, check_float_timesteps, check_like, check_tensor, check_timesteps

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


class NoiseSchedule:
    """A discrete variance-preserving diffusion schedule.

    Timesteps are integers 0..T-1 (row t of the table). For rectified flow (SD3, Flux) use
    NoiseSchedule.flow_matching() or from_diffusers(FlowMatchEulerDiscreteScheduler): a
    FlowMatchingSchedule, with float timesteps and prediction_type "flow_prediction".

    Args:
        alphas_cumprod: 1-D tensor of length T with values in [0, 1], non-increasing.
        prediction_type: what the model predicts: "epsilon", "v_prediction" or "sample"
            ("flow_prediction" is refused here: it needs a FlowMatchingSchedule).

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
    def flow_matching(cls, num_train_timesteps: int = 1000, shift: float = 1.0,
                      prediction_type: str = "flow_prediction") -> "FlowMatchingSchedule":
        """Rectified flow as diffusers trains it (SD3, Flux): a FlowMatchingSchedule, see there."""
        return FlowMatchingSchedule(num_train_timesteps, shift, prediction_type)

    @classmethod
    def from_diffusers(cls, scheduler) -> "NoiseSchedule":
        """Read `alphas_cumprod` and `config.prediction_type` from a diffusers scheduler; for a
        flow-matching scheduler (FlowMatchEulerDiscreteScheduler, ...) a FlowMatchingSchedule with its
        training table (see FlowMatchingSchedule.from_diffusers)."""
        if is_diffusers_flow_scheduler(scheduler):
            return FlowMatchingSchedule.from_diffusers(scheduler)
        ac = getattr(scheduler, "alphas_cumprod", None)
        if not isinstance(ac, torch.Tensor):
            raise TypeError(f"scheduler: expected a diffusers scheduler with an `alphas_cumprod` tensor, or a "
                            f"flow-matching one (FlowMatchEulerDiscreteScheduler), got {type(scheduler).__name__}")
        config = getattr(scheduler, "config", None)
        if getattr(config, "use_flow_sigmas", False):  # DPMSolver & co.: their alphas_cumprod is not the flow
            raise InputError(f"scheduler: a {type(scheduler).__name__} with use_flow_sigmas=True samples a flow model "
                             "but holds no flow training table; pass the FlowMatchEulerDiscreteScheduler the model "
                             "trains with, or NoiseSchedule.flow_matching(shift=...)")
        prediction_type = getattr(config, "prediction_type", None) or "epsilon"
        return cls(ac, prediction_type)

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
        """Timesteps this table takes: integers of shape (batch,) in [0, T-1] (floats sigma * T in [0, T]
        for a FlowMatchingSchedule); host=False checks the range with a device-side assert (no sync)."""
        check_timesteps(name, timesteps, batch, self.num_train_timesteps, device, host=host)

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
        self.check_timesteps("timesteps", timesteps, x0.shape[0], x0.device)
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


def _check_vp_prediction_type(prediction_type) -> None:
    """A prediction type of variance-preserving tables; "flow_prediction" gets its own message."""
    if prediction_type in FLOW_PREDICTION_TYPES:
        raise InputError(
            f"prediction_type: {prediction_type!r} needs a flow-matching schedule (NoiseSchedule.flow_matching() or "
            "NoiseSchedule.from_diffusers(FlowMatchEulerDiscreteScheduler(...))), got a variance-preserving table; "
            "on it use 'epsilon', 'v_prediction' or 'sample'")
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES)


def is_diffusers_flow_scheduler(scheduler) -> bool:
    """True for diffusers' flow-matching schedulers (FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler,
    FlowMatchLCMScheduler): a `scale_noise` method and `num_train_timesteps` and `shift` in the config, no
    `alphas_cumprod` table."""
    config = getattr(scheduler, "config", None)
    return (callable(getattr(scheduler, "scale_noise", None))
            and not isinstance(getattr(scheduler, "alphas_cumprod", None), torch.Tensor)
            and getattr(config, "num_train_timesteps", None) is not None and getattr(config, "shift", None) is not None)


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

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0, prediction_type: str = "flow_prediction"):
        _check_T(num_train_timesteps)
        if isinstance(shift, bool) or not isinstance(shift, (int, float)) or not math.isfinite(shift) or shift <= 0:
            raise InputError(f"shift: expected a finite number > 0, got {shift!r}")
        T = num_train_timesteps
        self._num_train_timesteps = T
        self.shift = float(shift)
        # diffusers' operations in diffusers' dtype: the float timesteps users pass are these values.
        u = torch.arange(T, 0, -1, dtype=torch.float32) / T
        u = self.shift * u / (1 + (self.shift - 1) * u)
        self.timesteps = u * T
        self.sigmas = self.timesteps.double() / T  # what the lookups give for the table's timesteps
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
    def alphas_cumprod(self):
        raise AttributeError("alphas_cumprod: a flow-matching schedule has no variance-preserving table; use "
                             "alpha_sigma(timesteps) (1 - sigma, sigma) or `sigmas`")

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

    def _timesteps_by_noise(self, device: torch.device) -> torch.Tensor:
        """The table's timesteps in order of increasing noise (entry j: the j-th least noisy), on `device`."""
        table = self._tables.get(device)
        if table is None:
            table = self._tables[device] = self.timesteps.flip(0).to(device)
        return table

    def __repr__(self) -> str:
        return (f"FlowMatchingSchedule(T={self.num_train_timesteps}, shift={self.shift:g}, "
                f"prediction_type={self.prediction_type!r})")


def _check_T(num_train_timesteps) -> None:
    if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
        raise InputError(f"num_train_timesteps: expected an int >= 2, got {num_train_timesteps!r}")


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
        if isinstance(schedule, FlowMatchingSchedule):
            t = schedule._timesteps_by_noise(t.device)[t]
        return t.to(device) if device is not None else t
