"""Models: the small UNet of the default job, and truncated forwards for known architectures."""
from .unet import UNet

__all__ = ["UNet"]
