"""Fused ops of the self-perceptual objective. Each has a pure-PyTorch reference in `reference`."""
from .feature_mse import feature_mse
from .renoise import renoise

__all__ = ["feature_mse", "renoise"]
