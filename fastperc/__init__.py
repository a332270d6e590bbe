"""fastperc: the self-perceptual objective for diffusion training (Lin & Yang, arXiv 2401.00110)."""
from . import ops
from .errors import InputError
from .loss import SelfPerceptualLoss, self_perceptual_loss
from .schedule import FlowMatchingSchedule, NoiseSchedule, TimestepDistribution, VPSchedule
from .teacher import FrozenTeacher

__version__ = "0.1.0"
__all__ = ["self_perceptual_loss", "SelfPerceptualLoss", "NoiseSchedule", "VPSchedule", "FlowMatchingSchedule",
           "TimestepDistribution", "FrozenTeacher", "InputError", "ops"]
