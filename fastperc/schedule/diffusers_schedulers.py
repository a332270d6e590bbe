"""Reading a diffusers scheduler: which kind it is, and the fastperc schedule it trains with."""
from __future__ import annotations

import torch

from ..errors import InputError


def is_diffusers_flow_scheduler(scheduler) -> bool:
    """True for diffusers' flow-matching schedulers (FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler,
    FlowMatchLCMScheduler): a `scale_noise` method and `num_train_timesteps` and `shift` in the config, no
    `alphas_cumprod` table."""
    config = getattr(scheduler, "config", None)
    return (callable(getattr(scheduler, "scale_noise", None))
            and not isinstance(getattr(scheduler, "alphas_cumprod", None), torch.Tensor)
            and getattr(config, "num_train_timesteps", None) is not None and getattr(config, "shift", None) is not None)


def from_diffusers(scheduler):
    """The fastperc schedule of a diffusers scheduler: FlowMatchingSchedule.from_diffusers for a
    flow-matching one, else a VPSchedule of its `alphas_cumprod` and `config.prediction_type`."""
    from .flow_matching import FlowMatchingSchedule
    from .variance_preserving import VPSchedule
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
    return VPSchedule(ac, prediction_type)
