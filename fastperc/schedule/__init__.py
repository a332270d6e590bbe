"""Noise schedules: x_t = alpha_t * x0 + sigma_t * noise.

`NoiseSchedule` is the protocol every caller uses (noising, targets, conversions, re-noise
coefficients, the timestep table, sampler steps); `VPSchedule` (variance-preserving tables, integer
timesteps) and `FlowMatchingSchedule` (rectified flow, float timesteps sigma * T) are its two
siblings. `isinstance(s, NoiseSchedule)` is true for both. No code outside this package branches on
which one it holds.
"""
from .base import NoiseSchedule
from .diffusers_schedulers import is_diffusers_flow_scheduler
from .flow_matching import FlowMatchingSchedule
from .timestep_distribution import DENSITIES, MODE_SCALE_RANGE, TimestepDistribution
from .variance_preserving import FLOW_PREDICTION_TYPES, PREDICTION_TYPES, RENOISE_COEF_BOUND, VPSchedule

__all__ = ["NoiseSchedule", "VPSchedule", "FlowMatchingSchedule", "TimestepDistribution", "is_diffusers_flow_scheduler",
           "PREDICTION_TYPES", "FLOW_PREDICTION_TYPES", "RENOISE_COEF_BOUND", "DENSITIES", "MODE_SCALE_RANGE"]
