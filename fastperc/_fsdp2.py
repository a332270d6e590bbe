"""FSDP2 where this torch keeps it: `torch.distributed.fsdp` (torch >= 2.6) or its earlier home."""
from __future__ import annotations

from torch import nn


def fsdp2():
    """(fully_shard, FSDPModule), or None on a torch without distributed support."""
    try:
        from torch.distributed.fsdp import FSDPModule, fully_shard
    except ImportError:
        try:  # torch 2.4 - 2.5 kept it here
            from torch.distributed._composable.fsdp import FSDPModule, fully_shard
        except ImportError:
            return None
    return fully_shard, FSDPModule


def is_fsdp2_module(model: nn.Module) -> bool:
    """True for a module sharded with FSDP2's fully_shard (its class becomes FSDP<Name>)."""
    found = fsdp2()
    return found is not None and isinstance(model, found[1])
