"""Models: the small UNet and DiT of the default job (call signature model(sample, timestep, class_labels)).
Importing this package registers their teacher adapters."""
from . import adapters  # noqa: F401  (registers the UNet's and the DiT's truncated forwards)
from .dit import DiT
from .unet import UNet

__all__ = ["DiT", "UNet"]
