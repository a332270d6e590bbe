"""`fastperc train --fsdp`: the student, its EMA and its optimizer state sharded with FSDP2, and the
checkpoint kept plain: full state dicts gathered to rank 0, so `fastperc sample` loads it in one process
and a resumed run (with the same number of processes or not) starts from the same tensors."""
from __future__ import annotations

from torch import nn

from .._fsdp2 import fsdp2
from ..errors import InputError


def _fsdp():
    from torch.distributed.checkpoint import state_dict as dcp_state
    return fsdp2()[0], dcp_state


def _blocks(model: nn.Module) -> list[nn.Module]:
    """The units FSDP2 shards one by one: the entries of the model's ModuleLists (down / up blocks of a
    UNet, a transformer's blocks) and its midblock; the rest is sharded with the root."""
    units = [m for child in model.children() if isinstance(child, nn.ModuleList) for m in child]
    mid = getattr(model, "mid_block", None)
    return units + ([mid] if isinstance(mid, nn.Module) else [])


def shard_student(model: nn.Module, ema: nn.Module) -> None:
    """Shard the student and its EMA alike (block by block, then the root), so the EMA's update is one
    foreach operation over matching local shards."""
    fully_shard, _ = _fsdp()
    for net in (model, ema):
        blocks = _blocks(net)
        if not blocks:
            raise InputError(f"fsdp: {type(net).__name__} has no list of blocks to shard")
        for block in blocks:
            fully_shard(block)
        fully_shard(net)


def full_state(model: nn.Module, ema: nn.Module, opt) -> tuple[dict, dict, dict]:
    """Plain, full state dicts of the model, the EMA and the optimizer (keyed by parameter name), on the CPU
    of rank 0 (empty on the other ranks). Collective: every rank calls it."""
    _, dcp = _fsdp()
    options = dcp.StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (dcp.get_model_state_dict(model, options=options), dcp.get_model_state_dict(ema, options=options),
            dcp.get_optimizer_state_dict(model, opt, options=options))


def by_name(model: nn.Module, state: dict) -> dict:
    """An optimizer state dict keyed by parameter name, from one keyed by position (torch's own
    `state_dict()` of an optimizer built on `model.parameters()`); one keyed by name is returned as it is."""
    ids = [i for group in state.get("param_groups", []) for i in group["params"]]
    if all(isinstance(i, str) for i in ids):
        return state
    names = [n for n, _ in model.named_parameters()]
    if sorted(ids) != list(range(len(names))):
        raise InputError(f"optimizer: the checkpoint's optimizer holds {len(ids)} parameters, the model {len(names)}")
    return {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}


def load_optimizer(model: nn.Module, opt, state: dict) -> None:
    """Load a full optimizer state dict (keyed by name, as `full_state` saves it, or by position, as a run
    without --fsdp saves it) into the optimizer of a sharded or plain model."""
    _, dcp = _fsdp()
    dcp.set_optimizer_state_dict(model, opt, optim_state_dict=by_name(model, state),
                                 options=dcp.StateDictOptions(full_state_dict=True))
