"""An FP8 teacher: its Linear layers in FP8 (weights quantised once, inputs scaled per call, the input
gradient in FP8 too) give a loss and a gradient close to the bf16 teacher's; what is converted, what is
kept, and the refusals where FP8 cannot run.

Tolerances follow from the formats: e4m3 keeps 3 mantissa bits (a relative rounding error of at most
2^-4 per element), e5m2 keeps 2 (2^-3). A matmul of two rounded operands over random signs has a
normwise relative error of about sqrt(2) * 2^-4 / sqrt(3) = 0.05 in forward and 0.08 in backward
(e5m2 gradient times e4m3 weight); the bounds below leave a margin, and a lower bound proves that the
layer really quantises."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastperc
from fastperc import FlowMatchingSchedule, FrozenTeacher, InputError, self_perceptual_loss
from fastperc import teacher_fp8
from fastperc.models import DiT
from fastperc.teacher_fp8 import FP8Linear, fp8_unavailable, to_fp8

from .test_transformer_teachers import ARCHS, B, timesteps

FORWARD_BOUND, BACKWARD_BOUND = 0.08, 0.15


def relative_error(actual: torch.Tensor, truth: torch.Tensor) -> float:
    assert torch.isfinite(actual).all(), "NaN/Inf never passes"
    return float((actual.detach().double() - truth.double()).norm() / truth.double().norm())


def _skip_without_fp8(device):
    reason = fp8_unavailable(device)
    if reason:
        pytest.skip(reason)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fp8_linear_matches_a_float64_linear_within_the_formats_precision(dtype, device, gen):
    _skip_without_fp8(device)
    linear = nn.Linear(64, 48).to(device)
    layer = FP8Linear.from_linear(linear).to(device)
    x = (torch.randn(3, 5, 64, generator=gen) * 3).to(device, dtype).requires_grad_()
    y = layer(x)
    assert y.shape == (3, 5, 48) and y.dtype == dtype
    truth = F.linear(x.detach().double(), linear.weight.double(), linear.bias.double())
    assert 1e-3 < relative_error(y, truth) < FORWARD_BOUND
    grad = torch.randn(y.shape, generator=gen).to(device, dtype)
    (gx,) = torch.autograd.grad(y, x, grad)
    assert gx.dtype == dtype
    assert 1e-3 < relative_error(gx, grad.double() @ linear.weight.double()) < BACKWARD_BOUND
    assert not layer.weight.requires_grad and layer.weight.dtype == torch.uint8


def test_fp8_linear_propagates_nan_instead_of_hiding_it(gen):
    layer = FP8Linear.from_linear(nn.Linear(32, 16))
    x = torch.randn(4, 32, generator=gen)
    x[2, 5] = float("nan")
    assert torch.isnan(layer(x)).all()  # the per-tensor scale is NaN: every output is


def test_casting_an_fp8_layer_keeps_its_fp8_weight_and_fp32_scale(gen):
    layer = FP8Linear.from_linear(nn.Linear(32, 16))
    weight, scale = layer.weight.clone(), layer.weight_scale.clone()
    layer = layer.to(torch.bfloat16)
    assert torch.equal(layer.weight, weight) and layer.weight_scale.dtype == torch.float32
    assert torch.equal(layer.weight_scale, scale) and layer.bias.dtype == torch.bfloat16


def test_to_fp8_converts_only_linear_layers_with_dimensions_multiples_of_16():
    model = nn.Sequential(nn.Linear(32, 64), nn.Linear(64, 10), nn.Conv2d(16, 16, 1), nn.Linear(10, 16))
    assert to_fp8(model) == ("0",)
    assert isinstance(model[0], FP8Linear) and type(model[1]) is nn.Linear and type(model[3]) is nn.Linear


def _redrawn(model: nn.Module) -> nn.Module:
    """Weights drawn afresh at unit gain: fastperc's DiT starts with zero adaLN gates (every block the
    identity, which would hide its Linear layers), as DiT does."""
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.1))
    return model


TEACHERS = {
    "fastperc_dit": (lambda: _redrawn(DiT(image_size=16, depth=4, hidden=64, heads=2, num_classes=10)),
                     lambda g: ((B, 1, 16, 16), {"class_labels": torch.randint(0, 10, (B,), generator=g)})),
    **{name: (lambda name=name: ARCHS[name].make(),
              lambda g, name=name: (ARCHS[name].shape, ARCHS[name].kwargs(g))) for name in ("sd3", "flux", "dit")},
}


@pytest.mark.parametrize("name", TEACHERS)
def test_fp8_teacher_loss_and_gradient_are_close_to_the_bf16_teachers(name, device, gen):
    _skip_without_fp8(device)
    make, inputs = TEACHERS[name]
    model = make().eval().to(device)
    shape, kw = inputs(gen)
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    schedule = FlowMatchingSchedule()
    x0, noise, pred = (torch.randn(shape, generator=gen).to(device) for _ in range(3))
    pred.requires_grad_()
    t, t2 = (schedule.timesteps[torch.randint(0, 1000, (B,), generator=gen)].to(device) for _ in range(2))
    results = {}
    for kind, options in {"fp32": {}, "bf16": {"dtype": torch.bfloat16}, "fp8": {"fp8": True}}.items():
        teacher = FrozenTeacher(model, **options)
        loss = self_perceptual_loss(teacher, pred, x0, noise, t, schedule, timesteps_prime=t2, teacher_kwargs=kw)
        results[kind] = (loss.detach(), torch.autograd.grad(loss, pred)[0])
    (_, g32), (l16, g16), (l8, g8) = results["fp32"], results["bf16"], results["fp8"]
    assert torch.isfinite(l8) and l8 > 0
    # The stated tolerance: within 2% of the bf16 teacher's loss, the gradient within 10% (normwise);
    # typical: 0.3% and 2%, the worst of 16 seeds below 6%.
    assert abs(l8 - l16) <= 0.02 * l16, (float(l8), float(l16))
    assert relative_error(g8, g16) <= 0.10
    # ... and FP8 really ran: its features are not the bf16 teacher's.
    assert not torch.equal(l8, l16) and relative_error(g8, g32) > relative_error(g16, g32) / 4


def test_fp8_teacher_converts_the_blocks_linear_layers_and_keeps_the_embeddings():
    model = ARCHS["sd3"].make()
    teacher = FrozenTeacher(model, fp8=True)
    assert teacher.fp8_layers and all(n.startswith("transformer_blocks.") for n in teacher.fp8_layers)
    modules = dict(teacher.model.named_modules())
    assert all(isinstance(modules[n], FP8Linear) for n in teacher.fp8_layers)
    assert type(modules["time_text_embed.timestep_embedder.linear_1"]) is nn.Linear
    assert teacher.dtype == torch.bfloat16 and modules["time_text_embed.timestep_embedder.linear_1"].weight.dtype \
        == torch.bfloat16
    assert all(type(m) is nn.Linear for m in model.modules() if isinstance(m, nn.Linear))  # the source unchanged
    bf16 = FrozenTeacher(model, dtype=torch.bfloat16)
    assert teacher.held_bytes < bf16.held_bytes and teacher.held_parameters == bf16.held_parameters
    assert "fp8=" in repr(teacher)
    again = FrozenTeacher(teacher)  # a copy of an FP8 teacher stays FP8
    assert again.fp8_layers == teacher.fp8_layers


def test_fp8_teacher_with_pruning_and_checkpointing_keeps_the_order_prune_quantise_cast(gen):
    model = ARCHS["sd3"].make()
    teacher = FrozenTeacher(model, layers=("transformer_blocks.1",), fp8=True, checkpoint=True)
    assert "transformer_blocks.2" in teacher.pruned and not any(n.startswith("transformer_blocks.2")
                                                                 for n in teacher.fp8_layers)
    arch = ARCHS["sd3"]
    sample = torch.randn(arch.shape, generator=gen, requires_grad=True)
    (feat,) = teacher(sample, timesteps(arch, gen), **arch.kwargs(gen))
    feat.float().square().sum().backward()
    assert torch.isfinite(sample.grad).all() and sample.grad.abs().sum() > 0


def test_fp8_needs_a_copy_a_bool_and_linear_layers():
    model = ARCHS["sd3"].make()
    with pytest.raises(InputError, match="fp8: .*copy=True"):
        FrozenTeacher(model, copy=False, fp8=True)
    with pytest.raises(TypeError, match="fp8: expected a bool"):
        FrozenTeacher(model, fp8="yes")
    with pytest.raises(InputError, match="dtype: .*fp8=True"):
        FrozenTeacher(model, dtype=torch.float8_e4m3fn)
    convolutions = nn.Sequential(nn.Conv2d(4, 16, 3), nn.SiLU(), nn.Conv2d(16, 16, 3), nn.Linear(16, 10))
    with pytest.raises(InputError, match="fp8: Sequential has no nn.Linear layer with both dimensions multiples of 16"):
        FrozenTeacher(convolutions, layers=("2",), fp8=True)


def test_fp8_teacher_is_refused_where_fp8_cannot_run_when_built_and_when_moved(monkeypatch):
    model = ARCHS["sd3"].make()
    teacher = FrozenTeacher(model, fp8=True)
    monkeypatch.setattr(teacher_fp8, "fp8_unavailable", lambda device: "no FP8 here")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # (with a GPU, a host build waits for the move)
    with pytest.raises(InputError, match=r"fp8: .* cannot run on cpu: no FP8 here; .*dtype=torch.bfloat16"):
        FrozenTeacher(model, fp8=True)
    with pytest.raises(InputError, match="fp8: .*no FP8 here"):
        teacher.to("cpu")


def test_fp8_is_unavailable_before_sm89_and_off_cuda_and_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    assert "sm_80" in fp8_unavailable("cuda:0") and "sm_89" in fp8_unavailable("cuda:0")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert fp8_unavailable("cuda:0") is None
    assert "mps" in fp8_unavailable("mps") and fp8_unavailable("meta") is None


def test_the_loss_module_builds_an_fp8_teacher():
    loss = fastperc.SelfPerceptualLoss(ARCHS["sd3"].make(), FlowMatchingSchedule(), teacher_fp8=True)
    assert loss.teacher.fp8_layers


@pytest.mark.slow
def test_compiling_the_loss_with_an_fp8_teacher_gives_the_eager_loss_and_gradient_in_one_graph(device, gen):
    _skip_without_fp8(device)
    torch._dynamo.reset()
    arch = ARCHS["sd3"]
    teacher = FrozenTeacher(arch.make().to(device), fp8=True)
    schedule = FlowMatchingSchedule()
    x0, noise = (torch.randn(arch.shape, generator=gen).to(device) for _ in range(2))
    t, t2 = timesteps(arch, gen).to(device), timesteps(arch, gen).to(device)
    kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in arch.kwargs(gen).items()}

    def step(p):
        return self_perceptual_loss(teacher, p, x0, noise, t, schedule, timesteps_prime=t2, teacher_kwargs=kw)

    explanation = torch._dynamo.explain(step)(torch.randn(arch.shape, generator=gen).to(device))
    assert explanation.graph_break_count == 0, [(r.reason, r.user_stack[-1:]) for r in explanation.break_reasons]
    pred = torch.randn(arch.shape, generator=gen).to(device).requires_grad_()
    want = step(pred)
    (want_grad,) = torch.autograd.grad(want, pred)
    got = torch.compile(step)(pred)
    (got_grad,) = torch.autograd.grad(got, pred)
    # The same FP8 arithmetic; only fusion and accumulation order differ.
    assert abs(float((got - want).detach())) <= 1e-3 * float(want.detach()) and relative_error(got_grad, want_grad) < 0.02


def test_under_autocast_the_fp8_layer_gives_autocasts_dtype_as_linear_does(gen):
    linear = nn.Linear(32, 16)
    layer = FP8Linear.from_linear(linear)
    x = torch.randn(4, 32, generator=gen, requires_grad=True)  # fp32, as a LayerNorm gives under autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, want = layer(x), linear(x)
    assert y.dtype == want.dtype == torch.bfloat16
    (gx,) = torch.autograd.grad(y.float().sum(), x)
    assert gx.dtype == torch.float32 and torch.isfinite(gx).all()


def test_a_non_contiguous_source_weight_is_stored_row_major():
    linear = nn.Linear(32, 48)
    linear.weight = nn.Parameter(torch.randn(32, 48).t())  # (48, 32), column-major
    layer = FP8Linear.from_linear(linear)
    assert layer.weight.is_contiguous() and layer.weight_fp8.t().stride() == (1, 32)
