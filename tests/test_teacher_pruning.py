"""A pruned teacher holds only what runs: the copy holds what a full forward enters before the tap returns,
building it never copies the rest, the caller's model is never changed, and features and gradients equal an
unpruned teacher's."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from fastperc import FrozenTeacher
from fastperc.models import DiT, UNet

from .test_diffusers import cond_unet
from .test_transformer_teachers import ARCHS, timesteps


def _fastperc_unet_inputs(g):
    return torch.randn(2, 1, 16, 16, generator=g), torch.tensor([3, 700]), {}


def _cond_unet_inputs(g):
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 700]), {
        "encoder_hidden_states": torch.randn(2, 5, 16, generator=g)}


def _arch_inputs(name):
    arch = ARCHS[name]
    return lambda g: (torch.randn(arch.shape, generator=g), timesteps(arch, g), arch.kwargs(g))


# family -> (model, inputs, shallow taps); each is tested at its default tap and at the shallow one.
FAMILIES = {
    "fastperc_unet": (lambda: UNet(block_channels=(8, 16, 32)), _fastperc_unet_inputs, ("conv_in", "down_blocks.0")),
    "fastperc_dit": (lambda: DiT(image_size=16, depth=4, hidden=32, heads=2), _fastperc_unet_inputs, ("blocks.0",)),
    "unet2d_condition": (cond_unet, _cond_unet_inputs, ("down_blocks.0",)),
    "dit": (ARCHS["dit"].make, _arch_inputs("dit"), ("transformer_blocks.0",)),
    "pixart": (ARCHS["pixart"].make, _arch_inputs("pixart"), ("transformer_blocks.0",)),
    "sd3": (ARCHS["sd3"].make, _arch_inputs("sd3"), ("transformer_blocks.0",)),
    "flux": (ARCHS["flux"].make, _arch_inputs("flux"), ("transformer_blocks.0",)),
}
CASES = [(name, tap) for name in FAMILIES for tap in ("default", "shallow")]


def entered_parameters(model: nn.Module, layers, call) -> int:
    """Parameters of the modules a full forward enters before every tap has returned (forward pre-hooks
    on every module of the full model; each module's own parameters, not its children's)."""
    class Stop(Exception):
        pass

    entered, fired = set(), set()
    modules = dict(model.named_modules())
    handles = [m.register_forward_pre_hook(lambda m, a, n=n: entered.add(n)) for n, m in modules.items()]

    def tap(name):
        def hook(m, a, out):
            fired.add(name)
            if fired >= set(layers):
                raise Stop
        return hook
    handles += [modules[n].register_forward_hook(tap(n)) for n in layers]
    try:
        with torch.no_grad():
            call()
    except Stop:
        pass
    finally:
        for h in handles:
            h.remove()
    return sum(p.numel() for n in entered for p in modules[n].parameters(recurse=False))


def _full_call(model, name, x, t, kw):
    """The model's own forward, with the timestep its family takes (Flux: t / 1000)."""
    if name.startswith("fastperc"):
        return lambda: model(x, t, **kw)
    arch_name = {"unet2d_condition": None}.get(name, name)
    model_t = ARCHS[arch_name].model_timestep(t) if arch_name else t
    return lambda: model(x, timestep=model_t, **kw)


@pytest.mark.parametrize("name, tap", CASES, ids=[f"{n}-{t}" for n, t in CASES])
def test_a_pruned_teacher_holds_what_runs_and_gives_the_unpruned_features_and_gradients(name, tap, gen):
    make, inputs, shallow = FAMILIES[name]
    model = make().eval()
    layers = None if tap == "default" else shallow
    teacher = FrozenTeacher(model, layers)
    whole = FrozenTeacher(model, layers, prune=False)
    x, t, kw = inputs(gen)
    entered = entered_parameters(model, teacher.layers, _full_call(model, name, x, t, kw))
    total = sum(p.numel() for p in model.parameters())
    assert teacher.pruned and whole.pruned == () and whole.held_parameters == total
    assert abs(teacher.held_parameters - entered) <= 0.02 * entered, (teacher.held_parameters, entered, total)
    assert teacher.held_parameters < total

    xp, xw = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = teacher(xp, t, **kw), whole(xw, t, **kw)
    for g, w in zip(got, want):
        assert torch.equal(g, w)
    sum(f.square().sum() for f in got).backward()
    sum(f.square().sum() for f in want).backward()
    assert torch.equal(xp.grad, xw.grad)


class AllocatedBytes(TorchDispatchMode):
    """Bytes of the new storages the ops dispatched under this mode create (views and aliases of their
    inputs are not new): what building a copy allocates."""

    def __init__(self):
        super().__init__()
        self.total, self.seen = 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for o in torch.utils._pytree.tree_leaves(out):
            if isinstance(o, torch.Tensor):
                ptr = o.untyped_storage().data_ptr()
                if ptr not in inputs and ptr not in self.seen:
                    self.seen.add(ptr)
                    self.total += o.untyped_storage().nbytes()
        return out


def test_building_a_pruned_copy_never_copies_the_dropped_modules_and_leaves_the_callers_model_whole():
    model = FAMILIES["sd3"][0]()
    before = {n: (id(p), p.clone()) for n, p in model.named_parameters()}
    with AllocatedBytes() as counter:
        teacher = FrozenTeacher(model, ("transformer_blocks.0",))
    assert teacher.held_bytes < 0.6 * sum(p.numel() * p.element_size() for p in model.parameters())
    assert counter.total <= teacher.held_bytes * 1.01  # what is kept, and nothing of the rest
    assert {n: id(p) for n, p in model.named_parameters()} == {n: i for n, (i, _) in before.items()}
    assert all(torch.equal(p, before[n][1]) and p.requires_grad for n, p in model.named_parameters())
    assert all(m is not None for m in model.transformer_blocks)


def test_copy_false_leaves_the_model_whole_and_prune_false_keeps_everything():
    model = UNet(block_channels=(8, 16))
    assert FrozenTeacher(model, copy=False).pruned == ()
    assert all(m is not None for m in model.up_blocks)
    kept = FrozenTeacher(UNet(block_channels=(8, 16)), prune=False)
    assert kept.pruned == () and kept.model.up_blocks[0] is not None


class ReadsAWeight(nn.Module):
    """No adapter: `head.weight` is read (tied) before the tap without `head` being called; `tail` runs
    after the tap; `unused` never runs."""

    def __init__(self):
        super().__init__()
        self.embed, self.head, self.block, self.tail = nn.Linear(4, 8), nn.Linear(8, 8), nn.Linear(8, 8), \
            nn.Linear(8, 4)
        self.unused = nn.Linear(4, 4)

    def forward(self, x, t):
        h = self.embed(x) + t[:, None]
        h = F.linear(h, self.head.weight)  # a parameter read without calling its module
        h = self.block(torch.relu(h))
        return self.tail(h)


def test_the_hook_path_prunes_only_with_example_inputs_and_keeps_parameters_read_without_a_call(gen):
    x, t = torch.randn(3, 4, generator=gen), torch.rand(3, generator=gen)
    model = ReadsAWeight()
    assert FrozenTeacher(model, ["block"]).pruned == ()  # which modules run depends on the inputs
    teacher = FrozenTeacher(model, ["block"], example_inputs=(x, t))
    assert set(teacher.pruned) == {"tail", "unused", "head.bias"}
    assert teacher.model.head is not None and teacher.model.head.weight is not None
    assert torch.equal(teacher(x, t)[0], FrozenTeacher(model, ["block"], prune=False)(x, t)[0])
    with pytest.raises(ValueError, match=r"example_inputs: expected \(sample, timestep\)"):
        FrozenTeacher(model, ["block"], example_inputs=[x, t])
    with pytest.raises(ValueError, match="example_inputs: they only serve to prune a copy"):
        FrozenTeacher(model, ["block"], copy=False, example_inputs=(x, t))
    with pytest.raises(RuntimeError, match=r"example_inputs: the forward on them never reached \['unused'\]"):
        FrozenTeacher(model, ["unused"], example_inputs=(x, t))


def test_a_pruned_teacher_is_not_probed_again_as_a_whole_model(monkeypatch):
    import fastperc.teacher as teacher_module
    first = FrozenTeacher(FAMILIES["flux"][0](), ("transformer_blocks.0",))
    monkeypatch.setattr(teacher_module, "find_adapter", lambda model: pytest.fail("probed again"))
    again = FrozenTeacher(first)
    assert again.layers == first.layers and again.truncated and again.pruned == first.pruned
    with pytest.raises(ValueError, match=r"layers: unknown layer 'transformer_blocks.1'.*was pruned after"):
        FrozenTeacher(first, ("transformer_blocks.1",))  # pruned away


def test_the_teacher_reports_what_it_holds_in_its_dtype():
    model = UNet(block_channels=(8, 16))
    fp32 = FrozenTeacher(model)
    bf16 = FrozenTeacher(model, dtype=torch.bfloat16)
    assert fp32.held_parameters == bf16.held_parameters
    assert bf16.held_bytes * 2 == fp32.held_bytes
    assert f"held={fp32.held_parameters:,} parameters" in repr(fp32)
