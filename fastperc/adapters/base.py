"""What an adapter is: the truncated forward of one model family, and the pieces every family shares
(the keep/stop feature collector, the mid-depth tap rule, signature probes)."""
from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn


class FeatureCollector:
    """Records the outputs of the stages in `keep` as a forward runs them, and says when the `stop`
    stage is reached (nothing after it needs to run). The one keep/stop rule of every truncated
    forward, fastperc's own models' `features` included.

    Example:
        >>> import torch
        >>> c = FeatureCollector(keep=frozenset({"a"}), stop="b")
        >>> c.step("a", torch.ones(1)), c.step("b", torch.zeros(1))
        (False, True)
        >>> sorted(c.out)
        ['a']
    """

    def __init__(self, keep: frozenset[str] = frozenset(), stop: str | None = None):
        self.keep, self.stop, self.out = keep, stop, {}

    def step(self, name: str, value) -> bool:
        """Record `value` as stage `name`'s output if kept; True when `name` is the stop stage."""
        if name in self.keep:
            self.out[name] = value
        return name == self.stop


def mid_depth_block(blocks: Sequence[str]) -> str:
    """The default tap of a model without a midblock: the last block of the first half of its stack
    (index N // 2 - 1 of N blocks; the only block of a one-block stack). The paper reports no result for
    transformers; halfway down the stack is the analogue of a UNet's midblock, the most compressed point
    before the network turns back towards its output.

    Example:
        >>> mid_depth_block([f"blocks.{i}" for i in range(8)])
        'blocks.3'
    """
    if not blocks:
        raise ValueError("blocks: expected a non-empty sequence of block names")
    return blocks[max(len(blocks) // 2 - 1, 0)]


def missing_attributes(model: nn.Module, names: Sequence[str]) -> list[str]:
    """Probe helper: the names in `names` that `model` lacks, each as a problem."""
    return [f"no attribute `{n}`" for n in names if not hasattr(model, n)]


def missing_parameters(fn, label: str, names: Sequence[str]) -> list[str]:
    """Probe helper: the keyword parameters in `names` that the callable `fn` does not take, as problems
    (a `**kwargs` parameter takes them all)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return [f"{label}: signature unreadable"]
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return []
    return [f"{label} takes no `{n}`" for n in names if n not in params]


class Adapter(ABC):
    """The truncated forward of one model family.

    An adapter lists its stages (submodule names in execution order; '|' joins several run as one
    stage) and runs them without exceptions or hooks, so `torch.compile` sees one straight-line graph,
    returning the outputs of the kept stages and running nothing after the stop stage. `probe` checks
    the structure and call signatures the adapter relies on before it is used: a model that fails it
    is run on the teacher's hook path instead (with one warning that gives the problems).

    Register one for a model class with `fastperc.adapters.register_adapter`.
    """

    @abstractmethod
    def stages(self, model: nn.Module) -> list[str]:
        """Stage names in execution order; '|' joins several submodules run as one stage."""

    @abstractmethod
    def run(self, model, sample, timestep, keep: frozenset[str], stop: str, **kwargs) -> dict[str, torch.Tensor]:
        """Outputs of the stages in `keep` (a joint block's: its image stream); nothing after `stop` runs.
        `timestep` is already the model's (`model_timestep`)."""

    def probe(self, model: nn.Module) -> list[str]:
        """The problems that keep this adapter from running `model` (missing submodules or methods,
        block signatures of another library version); [] when it fits."""
        return []

    def embeddings(self, model: nn.Module) -> list[str]:
        """The stages that embed the timestep and conditioning (no input gradient flows through them):
        a sharded teacher keeps them whole beside its root. Default: the first stage."""
        return self.stages(model)[:1]

    def tail(self, model: nn.Module) -> list[str]:
        """Names of the modules (or parameters) after the last stage, which `run` never reaches (the
        output head). A pruned teacher drops them."""
        return []

    def unused(self, model: nn.Module, stop: str) -> list[str]:
        """Names of the modules (or parameters) a run that stops after `stop` never reaches: the stages
        after it and the tail. Names the model lacks (an optional module left None) are left out."""
        stages = self.stages(model)
        after = [name for stage in stages[stages.index(stop) + 1:] for name in stage.split("|")]
        present = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
        return [n for n in after + list(self.tail(model)) if n in present]

    def stage_of(self, model: nn.Module, layer: str) -> int | None:
        """Index of the stage that contains `layer` (a submodule name), or None if not covered."""
        for i, stage in enumerate(self.stages(model)):
            for prefix in stage.split("|"):
                if layer == prefix or layer.startswith(prefix + "."):
                    return i
        return None

    def supports(self, kwargs: dict[str, Any]) -> bool:
        """Whether `run` takes these keyword inputs (else the call goes through the hook path)."""
        return True

    def required(self, model: nn.Module) -> tuple[str, ...]:
        """The keyword inputs this model cannot run without (its conditioning): checked by the loss
        before the teacher runs, so a missing one is named as such."""
        return ()

    def model_timestep(self, timestep):
        """The timestep the model's forward takes, from the one the loss passes the teacher (the
        schedule's timesteps: DDPM indices, or sigma * 1000 for flow matching). Default: as given."""
        return timestep

    def blocks(self, model: nn.Module) -> list[str]:
        """The transformer's block stack in execution order ([] for UNets: they have a midblock)."""
        return []


def timesteps_for(sample: torch.Tensor, timestep) -> torch.Tensor:
    """The timestep as a (batch,) tensor on the sample's device (a Python number or 0-d tensor broadcast)."""
    t = timestep if torch.is_tensor(timestep) else torch.tensor([timestep], dtype=torch.long, device=sample.device)
    t = t[None] if t.dim() == 0 else t
    return t.to(sample.device).expand(sample.shape[0])
