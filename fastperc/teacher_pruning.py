"""What a teacher holds: a copy of the model without the modules its forward never reaches.

Nothing after the deepest tap runs, so a frozen copy needs only the modules before it. Two ways to
know which those are:

- a known family's adapter lists its stages: everything in a stage after the stop stage, and the
  output head no truncated forward runs (`Adapter.tail`), is dropped (`Adapter.unused`);
- any other model is run once on example inputs up to the deepest tap, recording every parameter and
  buffer an operation reads and every module called (`unused_by_trace`): a subtree with none of them
  is dropped. Which modules run can depend on the call's arguments, so this needs the inputs the
  teacher will be called with.

`copy_without` then deep-copies the model with the dropped modules and parameters replaced by None
in the copy's tables, so they are never copied, not even for a moment; the caller's model is untouched.
"""
from __future__ import annotations

import copy as _copy
from collections.abc import Iterable, Sequence

import torch
from torch import nn
from torch.overrides import TorchFunctionMode


class _StopTrace(Exception):
    pass


class _ReadTensors(TorchFunctionMode):
    """Records the ids of every tensor passed to a torch function (parameters and buffers included)."""

    def __init__(self):
        super().__init__()
        self.ids: set[int] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for value in _flatten((args, kwargs)):
            if isinstance(value, torch.Tensor):
                self.ids.add(id(value))
        return func(*args, **kwargs)


def _flatten(value) -> Iterable:
    if isinstance(value, (list, tuple)):
        for v in value:
            yield from _flatten(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _flatten(v)
    else:
        yield value


def unused_by_trace(model: nn.Module, layers: Sequence[str], call) -> list[str]:
    """Names of the maximal subtrees (modules, and parameters held directly by a kept module) that the
    forward `call()` neither calls nor reads before every module in `layers` has returned. `call` runs
    the model once (no grad); the forward is stopped after the deepest tap."""
    modules = dict(model.named_modules())
    called: set[str] = set()
    fired: set[str] = set()

    def pre_hook(name):
        def hook(module, args):
            called.add(name)
        return hook

    def tap_hook(name):
        def hook(module, args, output):
            fired.add(name)
            if fired >= set(layers):
                raise _StopTrace
        return hook

    handles = [m.register_forward_pre_hook(pre_hook(n)) for n, m in modules.items()]
    handles += [modules[n].register_forward_hook(tap_hook(n)) for n in layers]
    reads = _ReadTensors()
    try:
        with torch.no_grad(), reads:
            call()
    except _StopTrace:
        pass
    finally:
        for h in handles:
            h.remove()
    missing = set(layers) - fired
    if missing:
        raise RuntimeError(f"example_inputs: the forward on them never reached {sorted(missing)}; pass the inputs the "
                           "teacher will be called with")

    # A module is used if it or anything inside it was called, or a tensor it holds was read.
    entered = {".".join(n.split(".")[:i]) for n in called for i in range(1, n.count(".") + 2)}

    def used(name: str, module: nn.Module) -> bool:
        return name in entered or any(id(t) in reads.ids for t in (*module.parameters(), *module.buffers()))

    dropped: list[str] = []

    def visit(prefix: str, module: nn.Module) -> None:
        for name, p in module.named_parameters(recurse=False):
            if p is not None and id(p) not in reads.ids:
                dropped.append(f"{prefix}{name}")
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if not used(full, child):
                dropped.append(full)
            else:
                visit(f"{full}.", child)

    visit("", model)
    return dropped


def copy_without(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """A deep copy of `model` in which the named modules and parameters are None (their names stay
    reserved, the modules before them keep their names and indices). The dropped ones are never copied."""
    lookup = dict(model.named_modules())
    params = dict(model.named_parameters())
    memo: dict[int, object] = {}
    for name in names:
        target = lookup.get(name, params.get(name))
        if target is None:
            raise KeyError(name)
        memo[id(target)] = None  # deepcopy returns the memo's entry instead of copying
    return _copy.deepcopy(model, memo)


def held(model: nn.Module) -> tuple[int, int]:
    """(parameters, bytes of parameters and buffers) that `model` holds on this process, each tensor
    counted once; a sharded (DTensor) parameter counts its local shard."""
    seen: set[int] = set()
    count = nbytes = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) in seen:
            continue
        seen.add(id(t))
        local = t.to_local() if hasattr(t, "to_local") else t
        nbytes += local.numel() * local.element_size()
        if isinstance(t, nn.Parameter):
            count += local.numel()
    return count, nbytes


def plain_class(model: nn.Module) -> type:
    """The model's own class under FSDP2's dynamic FSDP<Name> subclass."""
    return next(c for c in type(model).__mro__ if not getattr(c, "__module__", "").startswith("torch.distributed"))


def copy_from_shards(model: nn.Module, names: Sequence[str]) -> nn.Module:
    """A plain (unsharded) copy of an FSDP2-sharded model without the named modules and parameters, built
    on the meta device from the model's class and config (FSDP refuses deepcopy) and filled with the kept
    tensors gathered one at a time: the dropped ones are never gathered. Collective: every rank calls it.
    Needs a class that rebuilds itself from its config (diffusers' `from_config`)."""
    cls = plain_class(model)
    if not callable(getattr(cls, "from_config", None)) or getattr(model, "config", None) is None:
        raise TypeError(f"model: an FSDP2-sharded {cls.__name__} can only be copied when its class rebuilds itself "
                        "from a config (diffusers' from_config); build the teacher from the unsharded model "
                        "before sharding the student, or pass copy=False with a frozen sharded model")
    with torch.device("meta"):
        clone = cls.from_config(model.config)
    dropped = tuple(names)
    lookup = dict(clone.named_modules())
    for name in dropped:  # on the meta clone: nothing to free, only the names to leave out
        parent, _, leaf = name.rpartition(".")
        owner = lookup[parent] if parent else clone
        if leaf in owner._modules:
            owner._modules[leaf] = None
        else:
            owner._parameters[leaf] = None
    state = {}
    for key, value in model.state_dict().items():
        if any(key == d or key.startswith(d + ".") for d in dropped):
            continue
        state[key] = value.full_tensor() if hasattr(value, "full_tensor") else value
    missing, unexpected = clone.load_state_dict(state, strict=False, assign=True)
    buffers = dict(model.named_buffers())  # FSDP2 shards parameters only: buffers are whole on every rank
    for name, buffer in list(clone.named_buffers()):
        if buffer.is_meta and name in buffers:  # a non-persistent buffer: not in the state dict
            parent, _, leaf = name.rpartition(".")
            (lookup[parent] if parent else clone)._buffers[leaf] = buffers[name].clone()
    left = [n for n, t in list(clone.named_parameters()) + list(clone.named_buffers()) if t.is_meta]
    if unexpected or left:
        raise RuntimeError(f"model: the sharded model's state dict does not rebuild {cls.__name__}: unexpected "
                           f"{unexpected[:5]}, not filled {left[:5]}")
    return clone
