"""Adapters: each family's probe, the registry (subclasses, FSDP2-sharded models, one's own class) and the
hook-path fallback when a probe fails."""
from __future__ import annotations

import inspect

import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from torch import nn

import fastperc
from fastperc import FrozenTeacher
from fastperc.adapters import Adapter, FeatureCollector, family_of, find_adapter, mid_depth_block, register_adapter
from fastperc.adapters import dit as dit_family, flux as flux_family, sd3 as sd3_family, unets
from fastperc.models import DiT, UNet
from fastperc.models.adapters import FastpercDiTAdapter, FastpercUNetAdapter

from .test_diffusers import cond_unet, plain_unet
from .test_transformer_teachers import ARCHS, timesteps


FAMILIES = {
    "unet2d": (plain_unet, unets.DiffusersUNet2DAdapter),
    "unet2d_condition": (cond_unet, unets.DiffusersUNet2DConditionAdapter),
    "dit": (ARCHS["dit"].make, dit_family.DiTAdapter),
    "pixart": (ARCHS["pixart"].make, dit_family.PixArtAdapter),
    "sd3": (ARCHS["sd3"].make, sd3_family.SD3Adapter),
    "sd35": (ARCHS["sd35"].make, sd3_family.SD3Adapter),
    "flux": (ARCHS["flux"].make, flux_family.FluxAdapter),
    "fastperc_unet": (lambda: UNet(block_channels=(8, 16)), FastpercUNetAdapter),
    "fastperc_dit": (lambda: DiT(depth=2, hidden=32, heads=2), FastpercDiTAdapter),
}


@pytest.mark.parametrize("name", FAMILIES)
def test_each_family_passes_its_probe_and_is_found(name):
    make, adapter_class = FAMILIES[name]
    model = make()
    adapter = find_adapter(model)
    assert type(adapter) is adapter_class and adapter.probe(model) == []
    assert FrozenTeacher(model).truncated


@pytest.mark.parametrize("name", ["unet2d_condition", "sd3", "flux", "fastperc_unet"])
def test_a_subclass_of_a_known_family_is_recognised_and_gives_the_parents_features(name, gen):
    make, adapter_class = FAMILIES[name]
    parent = make().eval()
    child = type(f"My{type(parent).__name__}", (type(parent),), {})  # a user's subclass, nothing overridden
    model = make()
    model.__class__ = child
    model.load_state_dict(parent.state_dict())
    assert type(find_adapter(model)) is adapter_class
    teacher, reference = FrozenTeacher(model), FrozenTeacher(parent)
    assert teacher.truncated and teacher.layers == reference.layers
    arch = {"unet2d_condition": None, "sd3": ARCHS["sd3"], "flux": ARCHS["flux"], "fastperc_unet": None}[name]
    if arch is not None:
        x, t, kw = torch.randn(arch.shape, generator=gen), timesteps(arch, gen), arch.kwargs(gen)
    elif name == "unet2d_condition":
        x, t, kw = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([3, 700]), {
            "encoder_hidden_states": torch.randn(2, 5, 16, generator=gen)}
    else:
        x, t, kw = torch.randn(2, 1, 16, 16, generator=gen), torch.tensor([3, 700]), {}
    with torch.no_grad():
        assert torch.equal(teacher(x, t, **kw)[0], reference(x, t, **kw)[0])


def _old_single_block_forward(block):
    """A Flux single block's forward with the signature diffusers had before 0.33 (no text stream)."""
    def forward(hidden_states, temb, image_rotary_emb=None, joint_attention_kwargs=None):
        raise AssertionError("not reached: the taps fire before the single blocks")
    return forward


def test_a_model_that_fails_its_probe_runs_on_the_hook_path_with_one_warning_that_says_why(gen):
    arch = ARCHS["flux"]
    intact = arch.make().eval()
    model = arch.make()
    model.load_state_dict(intact.state_dict())
    for block in model.single_transformer_blocks:
        block.forward = _old_single_block_forward(block)
    problems = flux_family.FluxAdapter().probe(model)
    assert any("single_transformer_blocks.0.forward takes no `encoder_hidden_states`" in p for p in problems)
    with pytest.warns(RuntimeWarning, match=r"FluxTransformer2DModel runs on the hook path .*single_transformer_blocks"
                                            r"\.0\.forward takes no `encoder_hidden_states`") as record:
        teacher = FrozenTeacher(model, layers=["transformer_blocks.1"], copy=False)
    assert len([w for w in record if "hook path" in str(w.message)]) == 1
    assert not teacher.truncated
    assert type(family_of(model)) is flux_family.FluxAdapter  # the timestep convention still holds: t / 1000
    x, t, kw = torch.randn(arch.shape, generator=gen), timesteps(arch, gen), arch.kwargs(gen)
    with torch.no_grad():
        got = teacher(x, t, **kw)[0]
        want = FrozenTeacher(intact, layers=["transformer_blocks.1"], copy=False)(x, t, **kw)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FrozenTeacher(model, layers=["transformer_blocks.1"], copy=False)  # warned once per class and problem


def test_a_unet_missing_a_stage_fails_its_probe_by_name():
    model = plain_unet()
    del model.mid_block
    assert unets.DiffusersUNet2DAdapter().probe(model) == ["no attribute `mid_block`"]
    cond = cond_unet()
    cond.down_blocks[0].forward = lambda hidden_states, temb=None: None  # a block of another version
    assert unets.DiffusersUNet2DConditionAdapter().probe(cond) == [
        f"down_blocks.0.forward takes no `{n}`" for n in ("encoder_hidden_states", "attention_mask",
                                                           "cross_attention_kwargs", "encoder_attention_mask")]


class _TwoStage(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder, self.decoder = nn.Linear(4, 8), nn.Linear(8, 4)

    def forward(self, x, t):
        return self.decoder(torch.relu(self.encoder(x) + t[:, None]))


class _TwoStageAdapter(Adapter):
    def __init__(self):
        self.calls = 0

    def stages(self, model):
        return ["encoder", "decoder"]

    def run(self, model, sample, timestep, keep, stop):
        self.calls += 1
        c = FeatureCollector(keep, stop)
        h = model.encoder(sample) + timestep[:, None]
        if c.step("encoder", h):
            return c.out
        c.step("decoder", model.decoder(torch.relu(h)))
        return c.out


def test_register_adapter_runs_ones_own_model_truncated_and_refuses_bad_registrations(gen):
    class Mine(_TwoStage):
        pass

    adapter = _TwoStageAdapter()
    register_adapter(Mine, adapter)
    model = Mine()
    teacher = FrozenTeacher(model, layers=["encoder"], copy=False)
    x, t = torch.randn(3, 4, generator=gen), torch.rand(3, generator=gen)
    assert teacher.truncated and find_adapter(model) is adapter
    got = teacher(x, t)[0]
    assert adapter.calls == 1 and torch.equal(got, model.encoder(x) + t[:, None])
    with pytest.raises(ValueError, match="model_class: an adapter is already registered"):
        register_adapter(Mine, _TwoStageAdapter())
    register_adapter(Mine, _TwoStageAdapter, replace=True)  # a factory: a fresh adapter per teacher
    assert type(find_adapter(model)) is _TwoStageAdapter and find_adapter(model) is not adapter
    with pytest.raises(TypeError, match="model_class: expected an nn.Module subclass"):
        register_adapter(int, _TwoStageAdapter())
    with pytest.raises(ValueError, match="model_class: expected a class or 'package.ClassName'"):
        register_adapter("NoPackage", _TwoStageAdapter())
    with pytest.raises(TypeError, match="adapter: expected a fastperc.adapters.Adapter"):
        register_adapter(Mine, object())


def test_a_model_of_no_registered_family_uses_the_hook_path_silently():
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        teacher = FrozenTeacher(_TwoStage(), layers=["encoder"])
    assert not teacher.truncated and find_adapter(_TwoStage()) is None


def test_the_mid_depth_rule_is_the_last_block_of_the_first_half():
    assert [mid_depth_block([f"b.{i}" for i in range(n)]) for n in (1, 2, 3, 4, 5, 8)] == \
        ["b.0", "b.0", "b.0", "b.1", "b.1", "b.3"]
    with pytest.raises(ValueError, match="blocks: expected a non-empty sequence"):
        mid_depth_block([])


def test_an_fsdp2_sharded_unet_is_recognised_and_gives_the_plain_models_features_and_gradients(
        one_process_group, gen):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    plain = plain_unet().eval()
    model = plain_unet()
    model.load_state_dict(plain.state_dict())
    mesh = init_device_mesh("cpu", (1,))
    for block in model.down_blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    assert type(model).__name__ == "FSDPUNet2DModel"
    copied = FrozenTeacher(model)  # FSDP refuses deepcopy: rebuilt plain from the config, then pruned
    assert type(copied.model) is UNet2DModel and copied.pruned and copied.truncated
    teacher = FrozenTeacher(model, copy=False)
    assert teacher.truncated and type(teacher._adapter) is unets.DiffusersUNet2DAdapter
    reference = FrozenTeacher(plain, copy=False)
    x, t = torch.randn(2, 3, 8, 8, generator=gen), torch.tensor([5, 600])
    for _ in range(2):  # the second call finds the blocks resharded after their forward
        xs, xr = x.clone().requires_grad_(), x.clone().requires_grad_()
        got, want = teacher(xs, t)[0], reference(xr, t)[0]
        assert torch.equal(copied(x, t)[0], want.detach())
        got.square().sum().backward()
        want.square().sum().backward()
        assert torch.equal(got, want)
        torch.testing.assert_close(xs.grad, xr.grad)


def test_every_adapter_file_registers_a_family_with_a_probe():
    for module in (unets, dit_family, sd3_family, flux_family):
        adapters = [c for _, c in inspect.getmembers(module, inspect.isclass)
                    if issubclass(c, Adapter) and c.__module__ == module.__name__]
        assert adapters, module.__name__
        for cls in adapters:
            assert cls.probe is not Adapter.probe, f"{cls.__name__} relies on structure it does not probe"


def test_the_old_module_name_forwards_with_a_deprecation_warning():
    import fastperc.truncated_forwards as old
    with pytest.warns(DeprecationWarning, match="use fastperc.adapters"):
        assert old.find_adapter is find_adapter
    with pytest.warns(DeprecationWarning):
        assert old.FluxAdapter is flux_family.FluxAdapter
    with pytest.raises(AttributeError):
        old.no_such_name
