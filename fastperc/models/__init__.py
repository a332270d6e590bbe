"""Models: the small UNet and DiT of the default job (call signature model(sample, timestep, class_labels))."""
from .dit import DiT
from .unet import UNet

__all__ = ["DiT", "UNet"]
