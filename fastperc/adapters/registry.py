"""Which adapter runs which model: a registry keyed by model class, searched along the model's MRO.

A model is matched by its class or any base class, so subclasses of a known family and FSDP2-sharded
models (`fully_shard` swaps the class for a subclass named FSDP<Name>) are recognised. Built-in
families are registered by (package, class name), so that neither diffusers nor fastperc's demo models
are imported to fill the registry; users register their own class objects.
"""
from __future__ import annotations

import warnings
from collections.abc import Callable

from torch import nn

from ..errors import InputError
from .base import Adapter

AdapterFactory = Callable[[], Adapter]

_BY_CLASS: dict[type, AdapterFactory] = {}
_BY_NAME: dict[tuple[str, str], AdapterFactory] = {}
_WARNED: set[tuple[type, str]] = set()


def register_adapter(model_class: type | str, adapter: Adapter | AdapterFactory, *, replace: bool = False) -> None:
    """Run models of `model_class` (and of its subclasses) with `adapter`'s truncated forward.

    Args:
        model_class: an nn.Module subclass, or "package.ClassName" to match a class by its top-level
            package and name without importing it (how the diffusers families are registered).
        adapter: an Adapter instance, or a callable returning one (called once per teacher).
        replace: allow replacing an adapter already registered for the class.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from fastperc import FrozenTeacher
        >>> from fastperc.adapters import Adapter, FeatureCollector, register_adapter
        >>> class TwoStage(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.encoder, self.decoder = nn.Linear(4, 8), nn.Linear(8, 4)
        ...     def forward(self, x, t):
        ...         return self.decoder(self.encoder(x) + t[:, None])
        >>> class TwoStageAdapter(Adapter):
        ...     def stages(self, model):
        ...         return ["encoder", "decoder"]
        ...     def run(self, model, sample, timestep, keep, stop):
        ...         c = FeatureCollector(keep, stop)
        ...         h = model.encoder(sample) + timestep[:, None]
        ...         if c.step("encoder", h):
        ...             return c.out
        ...         c.step("decoder", model.decoder(h))
        ...         return c.out
        >>> register_adapter(TwoStage, TwoStageAdapter())
        >>> teacher = FrozenTeacher(TwoStage(), layers=["encoder"])
        >>> teacher.truncated, teacher(torch.randn(2, 4), torch.tensor([1.0, 2.0]))[0].shape
        (True, torch.Size([2, 8]))
    """
    if not callable(adapter) and not isinstance(adapter, Adapter):
        raise TypeError(f"adapter: expected a fastperc.adapters.Adapter or a callable returning one, got "
                        f"{type(adapter).__name__}")
    factory = (lambda: adapter) if isinstance(adapter, Adapter) else adapter
    if isinstance(model_class, str):
        package, _, name = model_class.rpartition(".")
        if not package or not name or "." in package:
            raise InputError(f"model_class: expected a class or 'package.ClassName' (e.g. 'diffusers.UNet2DModel'), "
                             f"got {model_class!r}")
        key, table = (package, name), _BY_NAME
    elif isinstance(model_class, type) and issubclass(model_class, nn.Module):
        key, table = model_class, _BY_CLASS
    else:
        raise TypeError(f"model_class: expected an nn.Module subclass or 'package.ClassName', got {model_class!r}")
    if key in table and not replace:
        raise InputError(f"model_class: an adapter is already registered for {model_class!r}; pass replace=True "
                         "to replace it")
    table[key] = factory


def candidates(model: nn.Module) -> list[tuple[type, Adapter]]:
    """The adapters registered for `model`'s class and its bases, most specific first."""
    found = []
    for cls in type(model).__mro__:
        factory = _BY_CLASS.get(cls) or _BY_NAME.get((cls.__module__.split(".")[0], cls.__name__))
        if factory is not None:
            found.append((cls, factory()))
    return found


def family_of(model: nn.Module) -> Adapter | None:
    """The most specific registered adapter of `model`'s class, probed or not: what the family's forward
    expects (its timestep convention, its required conditioning, its block stack) holds on the hook
    path too."""
    found = candidates(model)
    return found[0][1] if found else None


def find_adapter(model: nn.Module) -> Adapter | None:
    """The adapter for `model`: the most specific registered one whose probe passes. None (the hook
    path) for a model of no registered family, and for one whose every candidate's probe fails: that
    is warned about once per model class, with the problems the probes found."""
    problems = []
    for cls, adapter in candidates(model):
        found = adapter.probe(model)
        if not found:
            return adapter
        problems.append(f"{type(adapter).__name__} (for {cls.__name__}): {'; '.join(found)}")
    if problems:
        key = (type(model), " | ".join(problems))
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(f"fastperc: {type(model).__name__} runs on the hook path (a full forward stopped by hooks, "
                          f"not compile friendly): {' | '.join(problems)}", RuntimeWarning, stacklevel=3)
    return None


_JOINT_BLOCKS: set[tuple[str, str]] = set()


def register_joint_block(block_class: str) -> None:
    """Mark "package.ClassName" as a joint text-image block: its output is (text, image) and a tap on it
    gives the image stream, output[1]."""
    package, _, name = block_class.rpartition(".")
    _JOINT_BLOCKS.add((package, name))


def is_joint_block(module: nn.Module) -> bool:
    """True for a block registered with register_joint_block (its class or a base class)."""
    return any((c.__module__.split(".")[0], c.__name__) in _JOINT_BLOCKS for c in type(module).__mro__)
