"""Adapters: truncated forwards of known model families, run stage by stage up to the deepest tap.

One file per family: `unets` (diffusers UNet2DModel, UNet2DConditionModel), `dit` (diffusers DiT,
PixArt), `sd3` (SD3, SD3.5), `flux` (Flux). fastperc's own demo models register theirs from
`fastperc.models`. `find_adapter(model)` picks the registered adapter of the model's class or nearest
base class (subclasses and FSDP2-sharded models included) whose `probe` passes; other models run on
the teacher's hook path. `register_adapter` adds one's own model class.
"""
from . import dit, flux, sd3, unets  # noqa: F401  (each registers its family)
from .base import Adapter, FeatureCollector, mid_depth_block
from .registry import family_of, find_adapter, is_joint_block, register_adapter, register_joint_block

__all__ = ["Adapter", "FeatureCollector", "family_of", "find_adapter", "is_joint_block", "mid_depth_block", "register_adapter",
           "register_joint_block"]
