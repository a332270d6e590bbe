"""FrozenTeacher(checkpoint=True): the fake branch's teacher activations are recomputed block by block in
backward; values, gradients, hooks, truncation, compile and bf16 behave as without it."""
import copy

import pytest
import torch
import torch.utils.checkpoint
from diffusers import UNet2DConditionModel, UNet2DModel
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from fastperc import FrozenTeacher, NoiseSchedule, self_perceptual_loss

from .helpers import assert_close, tiny_unet


class Block(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.lin1, self.lin2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, h):
        return h + self.lin2(torch.tanh(self.lin1(h)))


class Generic(nn.Module):
    """No adapter: served by the generic hook path; its blocks sit in a ModuleList."""

    def __init__(self, channels=3, dim=16, depth=4):
        super().__init__()
        self.embed, self.time = nn.Linear(channels * 8 * 8, dim), nn.Embedding(1000, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.head = nn.Linear(dim, channels * 8 * 8)

    def forward(self, x, t):
        h = self.embed(x.flatten(1)) + self.time(t)
        for block in self.blocks:
            h = block(h)
        return self.head(h).view_as(x)


def plain_unet():
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8)


def cond_unet():
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)


# name -> (model factory, sample channels, teacher kwargs factory(gen))
ARCHS = {
    "fastperc": (lambda: tiny_unet(num_classes=3), 1, lambda g: {"class_labels": torch.randint(0, 3, (3,), generator=g)}),
    "diffusers_plain": (plain_unet, 3, lambda g: {}),
    "diffusers_cond": (cond_unet, 4, lambda g: {"encoder_hidden_states": torch.randn(3, 5, 16, generator=g)}),
    "generic": (Generic, 3, lambda g: {}),
}
CASES = [
    ("fastperc", ("mid_block",)), ("fastperc", ("down_blocks.0", "mid_block")), ("fastperc", ("mid_block.resnets.0",)),
    ("diffusers_plain", ("mid_block",)), ("diffusers_plain", ("down_blocks.0", "mid_block")),
    ("diffusers_plain", ("up_blocks.0",)),  # a decoder tap: the generic path on a diffusers model
    ("diffusers_cond", ("mid_block",)), ("diffusers_cond", ("down_blocks.1", "mid_block.attentions.0")),
    ("generic", ("blocks.1",)), ("generic", ("blocks.0", "blocks.2.lin1")),  # the second stops inside a block
]


def loss_and_grad(teacher, channels, kwargs, g, dtype=torch.float32):
    schedule = NoiseSchedule.scaled_linear()
    x0, noise = torch.randn(3, channels, 8, 8, generator=g), torch.randn(3, channels, 8, 8, generator=g)
    t, t2 = torch.randint(0, 1000, (3,), generator=g), torch.randint(0, 1000, (3,), generator=g)
    pred = torch.randn(3, channels, 8, 8, generator=g).to(dtype).requires_grad_()
    loss = self_perceptual_loss(teacher, pred, x0, noise, t, schedule, timesteps_prime=t2, teacher_kwargs=kwargs,
                                layer_weights=[1.0] * len(teacher.layers))
    (grad,) = torch.autograd.grad(loss, pred)
    return loss, grad


@pytest.mark.parametrize("arch, layers", CASES, ids=[f"{a}-{'+'.join(l)}" for a, l in CASES])
def test_checkpointed_teacher_gives_the_same_loss_and_gradient(arch, layers, gen):
    make, channels, kwargs = ARCHS[arch]
    model, kw = make(), kwargs(gen)
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    plain = FrozenTeacher(model, layers)
    ckpt = FrozenTeacher(model, layers, checkpoint=True)
    assert ckpt.checkpoint_units, "no block was checkpointed"
    loss, grad = loss_and_grad(plain, channels, kw, torch.Generator().manual_seed(seed))
    loss_c, grad_c = loss_and_grad(ckpt, channels, kw, torch.Generator().manual_seed(seed))
    assert loss > 0 and grad.abs().sum() > 0
    assert_close(loss_c, loss, rtol=1e-6, atol=1e-9, what="loss")
    assert_close(grad_c, grad, rtol=1e-5, atol=1e-9, what="grad")


def test_checkpoint_units_are_the_truncated_stages_or_the_generic_blocks():
    unet = FrozenTeacher(tiny_unet(), ("down_blocks.0",), checkpoint=True)
    assert unet.checkpoint_units == ("time_embedding", "down_blocks.0")  # conv_in (a leaf) skipped
    generic = FrozenTeacher(Generic(), ("blocks.1",), checkpoint=True)
    assert generic.checkpoint_units == ("blocks.0", "blocks.1", "blocks.2", "blocks.3")
    assert "checkpoint=True" in repr(generic)
    # Names are unchanged, and checkpoint=False wraps nothing.
    assert [n for n, _ in generic.model.named_modules()] == [n for n, _ in Generic().named_modules()]
    off = FrozenTeacher(tiny_unet())
    assert off.checkpoint_units == () and not any("forward" in vars(m) for m in off.model.modules())


def _count_unit_runs(model, probes):
    """Calls of each unit's first submodule: it runs inside the unit's checkpoint, so recomputes count."""
    mods, log = dict(model.named_modules()), []
    for unit, probe in probes.items():
        mods[probe].register_forward_pre_hook(lambda m, a, unit=unit: log.append(unit))
    return log


@pytest.mark.parametrize("arch, layers, probes, after", [
    ("fastperc", ("down_blocks.0", "mid_block"),
     {"down_blocks.0": "down_blocks.0.resnets.0", "down_blocks.1": "down_blocks.1.resnets.0",
      "mid_block": "mid_block.resnets.0"}, {"up_blocks.0": "up_blocks.0.resnets.0"}),
    ("generic", ("blocks.0", "blocks.2.lin1"),
     {"blocks.0": "blocks.0.lin1", "blocks.1": "blocks.1.lin1", "blocks.2": "blocks.2.lin1"},
     {"blocks.3": "blocks.3.lin1"}),
])
def test_backward_recomputes_one_block_at_a_time(arch, layers, probes, after, gen, monkeypatch):
    make, channels, _ = ARCHS[arch]
    teacher = FrozenTeacher(make(), layers, checkpoint=True, prune=False)  # `after` units must exist
    log = _count_unit_runs(teacher.model, {**probes, **after})
    calls = []
    real_checkpoint = torch.utils.checkpoint.checkpoint
    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", lambda *a, **k: calls.append(1) or real_checkpoint(*a, **k))
    x, t = torch.randn(2, channels, 8, 8, generator=gen), torch.randint(0, 1000, (2,), generator=gen)

    with torch.no_grad():  # the real branch: each unit once, no checkpoint
        teacher(x, t)
    assert log == list(probes) and calls == []
    log.clear()

    feats = teacher(x.clone().requires_grad_(), t)  # the fake branch: one checkpoint per unit that ran
    assert log == list(probes) and len(calls) == len(probes)
    log.clear()
    sum(f.square().sum() for f in feats).backward()
    # Backward rebuilds each unit once, deepest first (one block at a time, not the whole branch at once).
    assert log == list(probes)[::-1]
    assert not any(unit in log for unit in after)


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages made by ops under this mode that are still alive: now, and the peak."""

    def __init__(self):
        super().__init__()
        self.live, self.peak = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                s = t.untyped_storage()
                self.live.setdefault(StorageWeakRef(s), s.nbytes())
        self.peak = max(self.peak, self.now())
        return out

    def now(self):
        self.live = {r: n for r, n in self.live.items() if not r.expired()}
        return sum(self.live.values())


def test_checkpointing_shrinks_what_the_fake_branch_keeps_and_the_backward_peak(gen):
    model = tiny_unet(block_channels=(8, 16, 32), layers_per_block=2)
    x, t = torch.randn(4, 1, 32, 32, generator=gen), torch.randint(0, 1000, (4,), generator=gen)
    kept, peak = {}, {}
    for ckpt in (False, True):
        teacher = FrozenTeacher(model, ("mid_block",), checkpoint=ckpt)
        sample = x.clone().requires_grad_()
        with LiveBytes() as mode:
            (f,) = teacher(sample, t)
            kept[ckpt] = mode.now()  # what the graph holds for backward (and the feature itself)
            f.square().sum().backward()
        peak[ckpt] = mode.peak
    assert kept[True] < 0.5 * kept[False], kept  # about 0.07x here
    # About 0.45x here (the largest block and its gradients); one checkpoint around the whole branch
    # keeps as little after the forward but rebuilds everything at once: about 1.0x.
    assert peak[True] < 0.6 * peak[False], peak


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
def test_compiled_loss_with_a_checkpointed_teacher_matches_eager(backend, gen):
    torch._dynamo.reset()
    schedule = NoiseSchedule.scaled_linear()
    teacher = FrozenTeacher(tiny_unet(num_classes=3), layers=("down_blocks.0", "mid_block"), checkpoint=True)
    x0, noise = torch.randn(4, 1, 8, 8, generator=gen), torch.randn(4, 1, 8, 8, generator=gen)
    t, t2 = torch.randint(0, 1000, (4,), generator=gen), torch.randint(0, 1000, (4,), generator=gen)
    labels = torch.randint(0, 3, (4,), generator=gen)
    p = torch.randn(4, 1, 8, 8, generator=gen, requires_grad=True)

    def step(pred):
        return self_perceptual_loss(teacher, pred, x0, noise, t, schedule, timesteps_prime=t2,
                                    teacher_kwargs={"class_labels": labels})

    graphs = []

    def recording(gm, example_inputs):  # records the graph dynamo hands over
        graphs.append(gm)
        return torch._dynamo.lookup_backend(backend)(gm, example_inputs)

    eager = step(p)
    (g_eager,) = torch.autograd.grad(eager, p)
    loss = torch.compile(step, fullgraph=True, backend=recording)(p)
    (g,) = torch.autograd.grad(loss, p)
    assert_close(loss, eager, rtol=1e-5, atol=1e-7, what="compiled loss")
    assert torch.isfinite(g).all()
    assert float((g - g_eager).norm()) <= 1e-4 * float(g_eager.norm()), "compiled grad"
    # One graph, in which each of the three blocks (down_blocks.0, .1, mid_block) is its own checkpoint region.
    assert len(graphs) == 1 and graphs[0].code.count("higher_order.tag_activation_checkpoint(") == 3


def test_bf16_checkpointed_teacher_gives_finite_gradients_close_to_plain(gen):
    model = tiny_unet(num_classes=3)
    kw = {"class_labels": torch.randint(0, 3, (3,), generator=gen)}
    seed = int(torch.randint(0, 2**31, (1,), generator=gen))
    results = [loss_and_grad(FrozenTeacher(model, ("down_blocks.1", "mid_block"), dtype=torch.bfloat16,
                                           checkpoint=ckpt), 1, kw, torch.Generator().manual_seed(seed), torch.bfloat16)
               for ckpt in (False, True)]
    (loss, grad), (loss_c, grad_c) = results
    assert grad_c.dtype == torch.bfloat16 and torch.isfinite(grad_c.float()).all() and grad_c.abs().sum() > 0
    assert_close(loss_c, loss, rtol=1e-2, atol=1e-6, what="bf16 loss")
    assert_close(grad_c, grad, rtol=2e-2, atol=1e-3 * float(grad.abs().max()), what="bf16 grad")


def test_a_copied_checkpointed_teacher_runs_its_own_weights(gen):
    teacher = FrozenTeacher(Generic(), ("blocks.3",), checkpoint=True)
    clone = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in clone.parameters():
            p.mul_(0.5)
    x, t = torch.randn(2, 3, 8, 8, generator=gen, requires_grad=True), torch.randint(0, 1000, (2,), generator=gen)
    (a,), (b,) = teacher(x, t), clone(x, t)
    assert not torch.allclose(a, b)
    with torch.no_grad():
        (b_ref,) = clone(x, t)
    assert_close(b, b_ref, rtol=1e-6, atol=1e-7, what="copy under grad vs no_grad")


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_checkpoint_must_be_a_bool(value):
    with pytest.raises(TypeError, match=r"checkpoint: expected a bool .* got"):
        FrozenTeacher(tiny_unet(), checkpoint=value)


def test_module_form_passes_teacher_checkpoint_on(gen):
    from fastperc import SelfPerceptualLoss
    plain = SelfPerceptualLoss(tiny_unet(num_classes=3), NoiseSchedule.scaled_linear())
    ckpt = SelfPerceptualLoss(plain.teacher.model, NoiseSchedule.scaled_linear(), teacher_checkpoint=True)
    assert not plain.teacher.checkpoint and ckpt.teacher.checkpoint and ckpt.teacher.checkpoint_units
    x0, noise = torch.randn(3, 1, 8, 8, generator=gen), torch.randn(3, 1, 8, 8, generator=gen)
    t, t2 = torch.randint(0, 1000, (3,), generator=gen), torch.randint(0, 1000, (3,), generator=gen)
    labels = torch.randint(0, 3, (3,), generator=gen)
    p = torch.randn(3, 1, 8, 8, generator=gen, requires_grad=True)
    losses = [c(p, x0, noise, t, timesteps_prime=t2, class_labels=labels) for c in (plain, ckpt)]
    grads = [torch.autograd.grad(loss, p)[0] for loss in losses]
    assert_close(losses[1], losses[0].detach(), rtol=1e-6, atol=1e-8, what="loss")
    assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-8, what="grad")
