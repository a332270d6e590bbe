"""FrozenTeacher on transformers: diffusers DiT, PixArt, SD3 / SD3.5 and Flux through hook-free truncated
forwards, any other transformer (a SiT) through the hook path. Tiny random models, no downloads."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Callable

import pytest
import torch
import torch.nn.functional as F
from diffusers import DiTTransformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel
from torch import nn

import fastperc
from fastperc import FrozenTeacher, NoiseSchedule, self_perceptual_loss
from fastperc.teacher import default_layers

from .helpers import assert_close

B = 3


# ---- tiny models ----------------------------------------------------------------------------------

def dit():
    return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=4,
                                 sample_size=8, patch_size=2, norm_num_groups=1)


def pixart(additional_conditions=True):
    # inner_dim divisible by 3: the resolution and aspect-ratio embeddings take a third each.
    return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=8,
                                    num_layers=4, sample_size=8, patch_size=2, cross_attention_dim=24,
                                    caption_channels=12, use_additional_conditions=additional_conditions)


def sd3(sd35=False):
    extra = {"dual_attention_layers": (0, 1), "qk_norm": "rms_norm"} if sd35 else {}
    return SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=8,
                                 num_attention_heads=2, joint_attention_dim=12, caption_projection_dim=16,
                                 pooled_projection_dim=6, out_channels=4, pos_embed_max_size=8, **extra)


def flux(guidance=True):
    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=2, num_single_layers=3,
                                  attention_head_dim=8, num_attention_heads=2, joint_attention_dim=12,
                                  pooled_projection_dim=6, guidance_embeds=guidance, axes_dims_rope=(2, 2, 4))


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, C*4), as diffusers' Flux pipeline and training script pack latents."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def flux_ids(h=4, w=4, text=5):
    img = torch.zeros(h, w, 3)
    img[..., 1], img[..., 2] = torch.arange(h)[:, None].float(), torch.arange(w)[None].float()
    return img.reshape(h * w, 3), torch.zeros(text, 3)


def text(g, b=B, dim=12):
    return torch.randn(b, 5, dim, generator=g)


@dataclass
class Arch:
    make: Callable[[], nn.Module]
    shape: tuple  # the sample the teacher gets (Flux: packed latents)
    kwargs: Callable  # (generator) -> teacher kwargs
    model_timestep: Callable = lambda t: t  # what the model's forward takes from the loss's timesteps
    float_time: bool = False  # the loss passes float timesteps (sigma * 1000) for this family


def _flux_kwargs(g, guidance):
    img_ids, txt_ids = flux_ids()
    kw = {"encoder_hidden_states": text(g), "pooled_projections": torch.randn(B, 6, generator=g),
          "img_ids": img_ids, "txt_ids": txt_ids}
    return {**kw, "guidance": torch.full((B,), 3.5)} if guidance else {**kw, "joint_attention_kwargs": None}


def _pixart_kwargs(g, additional):
    kw = {"encoder_hidden_states": text(g)}
    if additional:
        return {**kw, "added_cond_kwargs": {"resolution": torch.tensor([[64.0, 64.0]] * B),
                                            "aspect_ratio": torch.ones(B, 1)}}
    # No added conditions, and a caption mask (1 keep, 0 discard) that the forward turns into a bias.
    mask = torch.ones(B, 5)
    mask[:, -2:] = 0
    return {**kw, "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}, "encoder_attention_mask": mask}


ARCHS = {
    "dit": Arch(dit, (B, 4, 8, 8), lambda g: {"class_labels": torch.randint(0, 1000, (B,), generator=g)}),
    "dit_kw": Arch(dit, (B, 4, 8, 8), lambda g: {"class_labels": torch.randint(0, 1000, (B,), generator=g),
                                                 "cross_attention_kwargs": None}),
    "pixart": Arch(pixart, (B, 4, 8, 8), lambda g: _pixart_kwargs(g, True)),
    "pixart_plain": Arch(lambda: pixart(False), (B, 4, 8, 8), lambda g: _pixart_kwargs(g, False)),
    "sd3": Arch(sd3, (B, 4, 8, 8), lambda g: {"encoder_hidden_states": text(g),
                                              "pooled_projections": torch.randn(B, 6, generator=g)}, float_time=True),
    "sd3_kw": Arch(sd3, (B, 4, 8, 8), lambda g: {"encoder_hidden_states": text(g), "joint_attention_kwargs": None,
                                                 "pooled_projections": torch.randn(B, 6, generator=g)},
                   float_time=True),
    "sd35": Arch(lambda: sd3(sd35=True), (B, 4, 8, 8),
                 lambda g: {"encoder_hidden_states": text(g), "pooled_projections": torch.randn(B, 6, generator=g)},
                 float_time=True),
    "flux": Arch(flux, (B, 16, 16), lambda g: _flux_kwargs(g, True), lambda t: t / 1000, float_time=True),
    "flux_noguide": Arch(lambda: flux(False), (B, 16, 16), lambda g: _flux_kwargs(g, False), lambda t: t / 1000,
                         float_time=True),
}
LAYERS = {
    "dit": [("transformer_blocks.0",), ("transformer_blocks.1",), ("pos_embed", "transformer_blocks.3")],
    "pixart": [("transformer_blocks.0",), ("transformer_blocks.2", "transformer_blocks.1"), ("adaln_single",)],
    "sd3": [("transformer_blocks.0",), ("transformer_blocks.1",), ("transformer_blocks.3",),  # the last: (None, image)
            ("transformer_blocks.0", "transformer_blocks.2"), ("transformer_blocks.1.attn",)],
    "flux": [("transformer_blocks.0",), ("transformer_blocks.1",), ("single_transformer_blocks.0",),
             ("transformer_blocks.0", "single_transformer_blocks.2"), ("single_transformer_blocks.1.attn",)],
}
FAMILY = {"dit": "dit", "dit_kw": "dit", "pixart": "pixart", "pixart_plain": "pixart", "sd3": "sd3",
          "sd3_kw": "sd3", "sd35": "sd3", "flux": "flux", "flux_noguide": "flux"}
CASES = [(arch, layers) for arch in ARCHS for layers in LAYERS[FAMILY[arch]]]
IMAGE_STREAM_BLOCKS = ("JointTransformerBlock", "FluxTransformerBlock", "FluxSingleTransformerBlock")


def timesteps(arch: Arch, g, b=B):
    """What the loss passes the teacher: integer DDPM indices, or sigma * 1000 for flow-matching families."""
    if arch.float_time:
        return torch.rand(b, generator=g) * 1000
    return torch.randint(0, 1000, (b,), generator=g)


def full_forward_features(model, layers, sample, timestep, **kwargs):
    """Ground truth: the untruncated forward, called with keywords, with hooks on `layers`; a joint block
    (text, image) gives its image stream, other tuples their first element."""
    modules, got = dict(model.named_modules()), {}

    def hook(name):
        def fn(module, args, out):
            if isinstance(out, tuple):
                out = out[1] if type(module).__name__ in IMAGE_STREAM_BLOCKS else out[0]
            got.setdefault(name, out)
        return fn

    handles = [modules[n].register_forward_hook(hook(n)) for n in layers]
    try:
        model(sample, timestep=timestep, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return [got[n] for n in layers]


# ---- truncated forwards -----------------------------------------------------------------------------

@pytest.mark.parametrize("name, layers", CASES, ids=[f"{a}-{'+'.join(l)}" for a, l in CASES])
def test_truncated_features_equal_the_full_forward(name, layers, gen):
    arch = ARCHS[name]
    model = arch.make().eval()
    teacher = FrozenTeacher(model, layers)
    x, t, kw = torch.randn(arch.shape, generator=gen), timesteps(arch, gen), arch.kwargs(gen)
    with torch.no_grad():
        got = teacher(x, t, **kw)
        want = full_forward_features(model, layers, x, arch.model_timestep(t), **kw)
    assert len(got) == len(layers)
    for layer, g, w in zip(layers, got, want):
        assert g.shape == w.shape and torch.equal(g, w), layer
    nested = any(layer.endswith(".attn") or layer == "adaln_single" for layer in layers)
    assert teacher.truncated == (not nested)  # a tap inside a stage is captured by a hook, still truncated


def test_joint_blocks_give_the_image_stream_not_the_text_stream(gen):
    """The trap: a (text, image) tuple's first element is the text stream (and SD3's last block's is None)."""
    arch = ARCHS["sd3"]
    teacher = FrozenTeacher(arch.make(), ("transformer_blocks.0", "transformer_blocks.3"))
    x, kw = torch.randn(arch.shape, generator=gen), arch.kwargs(gen)
    feats = teacher(x, timesteps(arch, gen), **kw)
    assert [tuple(f.shape) for f in feats] == [(B, 16, 16)] * 2  # 16 image tokens; the text has 5
    arch = ARCHS["flux"]
    teacher = FrozenTeacher(arch.make(), ("transformer_blocks.1", "single_transformer_blocks.0"))
    feats = teacher(torch.randn(arch.shape, generator=gen), timesteps(arch, gen), **arch.kwargs(gen))
    assert [tuple(f.shape) for f in feats] == [(B, 16, 16)] * 2


LAST_RUN = {  # arch -> (tap, modules that run, modules after the tap that must not)
    "dit": ("transformer_blocks.1", ["pos_embed", "transformer_blocks.0", "transformer_blocks.1"],
            ["transformer_blocks.2", "transformer_blocks.3", "proj_out_1", "proj_out_2"]),
    "pixart": ("transformer_blocks.0", ["pos_embed", "adaln_single", "caption_projection", "transformer_blocks.0"],
               ["transformer_blocks.1", "transformer_blocks.3", "proj_out"]),
    "sd3": ("transformer_blocks.1", ["pos_embed", "time_text_embed", "context_embedder", "transformer_blocks.0",
                                     "transformer_blocks.1"],
            ["transformer_blocks.2", "transformer_blocks.3", "norm_out", "proj_out"]),
    "sd35": ("transformer_blocks.0", ["transformer_blocks.0"], ["transformer_blocks.1", "norm_out"]),
    "flux": ("single_transformer_blocks.0", ["x_embedder", "time_text_embed", "context_embedder", "pos_embed",
                                             "transformer_blocks.0", "transformer_blocks.1",
                                             "single_transformer_blocks.0"],
             ["single_transformer_blocks.1", "single_transformer_blocks.2", "norm_out", "proj_out"]),
    "flux_noguide": ("transformer_blocks.0", ["transformer_blocks.0"],
                     ["transformer_blocks.1", "single_transformer_blocks.0", "norm_out"]),
}


@pytest.mark.parametrize("name", LAST_RUN)
def test_blocks_after_the_deepest_tap_never_run(name, gen):
    arch = ARCHS[name]
    tap, ran, not_run = LAST_RUN[name]
    teacher = FrozenTeacher(arch.make(), (tap,), prune=False)  # truncation alone
    assert teacher.truncated
    mods, calls = dict(teacher.model.named_modules()), {}
    for n in ran + not_run:
        mods[n].register_forward_pre_hook(lambda m, a, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
    teacher(torch.randn(arch.shape, generator=gen), timesteps(arch, gen), **arch.kwargs(gen))
    assert calls == {n: 1 for n in ran}


def test_unsupported_kwargs_and_outer_taps_use_the_hook_path_with_the_models_timestep(gen):
    """A LoRA scale (applied by the forward's decorator) or a tap outside the stages: the full forward,
    called with keywords, still with Flux's timestep / 1000 and the image stream of joint blocks."""
    arch = ARCHS["sd3"]
    model = arch.make().eval()
    x, t, kw = torch.randn(arch.shape, generator=gen), timesteps(arch, gen), arch.kwargs(gen)
    kw["joint_attention_kwargs"] = {"scale": 1.0}
    teacher = FrozenTeacher(model, ("transformer_blocks.3",))
    assert not teacher._adapter.supports(kw)
    with torch.no_grad():
        (got,), (want,) = teacher(x, t, **kw), full_forward_features(model, ("transformer_blocks.3",), x, t, **kw)
    assert torch.equal(got, want)

    arch = ARCHS["flux"]
    model = arch.make().eval()
    x, t, kw = torch.randn(arch.shape, generator=gen), timesteps(arch, gen), arch.kwargs(gen)
    for layers in (("norm_out",), ("transformer_blocks.1", "norm_out")):
        teacher = FrozenTeacher(model, layers)
        assert not teacher.truncated
        with torch.no_grad():
            got, want = teacher(x, t, **kw), full_forward_features(model, layers, x, t / 1000, **kw)
        assert all(torch.equal(g, w) for g, w in zip(got, want))


# ---- dtype --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["sd3", "flux"])
@pytest.mark.parametrize("path", ["truncated", "hooks"])
def test_bf16_teacher_casts_fp32_conditioning_and_keeps_timesteps_fp32(name, path, gen, monkeypatch):
    arch = ARCHS[name]
    layers = ("transformer_blocks.1",) if path == "truncated" else ("norm_out",)  # norm_out: outside the stages
    teacher = FrozenTeacher(arch.make(), layers, dtype=torch.bfloat16)
    assert teacher.truncated == (path == "truncated")
    seen = {}
    if path == "truncated":
        run = teacher._adapter.run
        monkeypatch.setattr(teacher._adapter, "run", lambda model, sample, timestep, keep, stop, **kw: (
            seen.update(sample=sample, timestep=timestep, **kw) or run(model, sample, timestep, keep, stop, **kw)))
    else:
        teacher.model.register_forward_pre_hook(lambda m, args, kw: seen.update(sample=args[0], **kw),
                                                with_kwargs=True)
    kw = arch.kwargs(gen)  # fp32, as text encoders and the data loader give them
    (f,) = teacher(torch.randn(arch.shape, generator=gen), timesteps(arch, gen), **kw)
    assert f.dtype == torch.bfloat16 and torch.isfinite(f.float()).all()
    assert seen["timestep"].dtype == torch.float32
    assert seen["sample"].dtype == seen["encoder_hidden_states"].dtype == seen["pooled_projections"].dtype \
        == torch.bfloat16
    if name == "flux":  # positions and the guidance scale are left alone, as timesteps are
        assert seen["img_ids"].dtype == seen["txt_ids"].dtype == seen["guidance"].dtype == torch.float32


@pytest.mark.parametrize("name", ["sd3", "flux", "pixart"])
def test_bf16_teacher_loss_with_fp32_conditioning_is_finite_and_close_to_fp32(name, gen):
    arch, layers, schedule = ARCHS[name], LOSS_CASES[name], NoiseSchedule.scaled_linear()
    model = arch.make()
    x0, noise, pred, t, t2, kw = loss_inputs(arch, gen)
    losses = [self_perceptual_loss(FrozenTeacher(model, layers, dtype=dtype), pred, x0, noise, t, schedule,
                                   timesteps_prime=t2, teacher_kwargs=kw) for dtype in (torch.bfloat16, None)]
    grad = torch.autograd.grad(losses[0], pred)[0]
    assert losses[0].dtype == torch.float32 and torch.isfinite(grad).all() and grad.abs().sum() > 0
    assert_close(losses[0], losses[1], rtol=0.05, atol=0, what="bf16 loss vs fp32")  # about 0.5% here


def test_bf16_integer_timesteps_and_labels_stay_integers(gen):
    arch = ARCHS["dit"]
    teacher = FrozenTeacher(arch.make(), ("transformer_blocks.1",), dtype=torch.bfloat16)
    seen = {}
    run = teacher._adapter.run
    teacher._adapter.run = lambda model, sample, t, keep, stop, **kw: (
        seen.update(t=t, **kw) or run(model, sample, t, keep, stop, **kw))
    (f,) = teacher(torch.randn(arch.shape, generator=gen), timesteps(arch, gen), **arch.kwargs(gen))
    assert f.dtype == torch.bfloat16 and seen["t"].dtype == seen["class_labels"].dtype == torch.long


# ---- the loss ---------------------------------------------------------------------------------------

LOSS_CASES = {
    "sd3": ("transformer_blocks.1", "transformer_blocks.3"),
    "sd35": ("transformer_blocks.2",),
    "flux": ("transformer_blocks.1", "single_transformer_blocks.0"),
    "dit": ("transformer_blocks.1",),
    "pixart": ("transformer_blocks.0", "transformer_blocks.2"),
}


def naive_loss(model, layers, arch, pred, x0, noise, t, t2, schedule, kw):
    """The objective written out: v-prediction re-noised by hand, full forwards with hooks, F.mse_loss per tap."""
    ac = schedule.alphas_cumprod.to(x0.dtype)
    shape = (-1,) + (1,) * (x0.dim() - 1)
    a, s = ac[t].sqrt().view(shape), (1 - ac[t]).sqrt().view(shape)
    a2, s2 = ac[t2].sqrt().view(shape), (1 - ac[t2]).sqrt().view(shape)
    x_t = a * x0 + s * noise
    x0_hat, eps_hat = a * x_t - s * pred, s * x_t + a * pred
    real, fake = a2 * x0 + s2 * noise, a2 * x0_hat + s2 * eps_hat
    with torch.no_grad():
        f_real = full_forward_features(model, layers, real, arch.model_timestep(t2), **kw)
    f_fake = full_forward_features(model, layers, fake, arch.model_timestep(t2), **kw)
    return sum(F.mse_loss(f, r) for f, r in zip(f_fake, f_real))


def loss_inputs(arch, g):
    x0, noise, pred = (torch.randn(arch.shape, generator=g) for _ in range(3))
    t, t2 = torch.randint(0, 1000, (B,), generator=g), torch.randint(0, 1000, (B,), generator=g)
    return x0, noise, pred.requires_grad_(), t, t2, arch.kwargs(g)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("name", LOSS_CASES)
def test_loss_and_gradient_equal_the_naive_objective(name, backend, gen):
    arch, layers = ARCHS[name], LOSS_CASES[name]
    schedule = NoiseSchedule.scaled_linear()  # integer t' for every family: equality does not need sigma units
    model = arch.make().eval()
    teacher = FrozenTeacher(model, layers)
    assert teacher.truncated
    model.requires_grad_(False)
    x0, noise, pred, t, t2, kw = loss_inputs(arch, gen)
    loss = self_perceptual_loss(teacher, pred, x0, noise, t, schedule, timesteps_prime=t2, teacher_kwargs=kw,
                                layer_weights=[1.0] * len(layers), backend=backend)
    (grad,) = torch.autograd.grad(loss, pred)
    want = naive_loss(model, layers, arch, pred, x0, noise, t, t2, schedule, kw)
    (want_grad,) = torch.autograd.grad(want, pred)
    assert want > 0 and want_grad.abs().sum() > 0
    assert_close(loss, want, rtol=1e-5, atol=1e-8, what="loss")
    assert_close(grad, want_grad, rtol=1e-4, atol=1e-6 * float(want_grad.abs().max()), what="grad")


class PackingTeacher(FrozenTeacher):
    """A Flux teacher that takes unpacked (B, C, H, W) latents and packs them before the model."""

    def forward(self, sample, timestep, **kwargs):
        return super().forward(pack(sample), timestep, **kwargs)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_flux_loss_on_packed_latents_equals_the_loss_on_unpacked_latents_packed_for_the_teacher(backend, gen):
    """The re-noise is elementwise per sample, so packing commutes with it: what the Flux training script
    passes (packed latents, prediction and noise) gives the loss of the unpacked ones."""
    schedule, arch, layers = NoiseSchedule.scaled_linear(), ARCHS["flux"], ("transformer_blocks.0",
                                                                            "single_transformer_blocks.1")
    model = arch.make()
    x0, noise, pred = (torch.randn(B, 4, 8, 8, generator=gen) for _ in range(3))
    t, t2 = torch.randint(0, 1000, (B,), generator=gen), torch.randint(0, 1000, (B,), generator=gen)
    kw = arch.kwargs(gen)
    pred.requires_grad_()
    packed = self_perceptual_loss(FrozenTeacher(model, layers), pack(pred), pack(x0), pack(noise), t, schedule,
                                  timesteps_prime=t2, teacher_kwargs=kw, backend=backend)
    unpacked = self_perceptual_loss(PackingTeacher(model, layers), pred, x0, noise, t, schedule,
                                    timesteps_prime=t2, teacher_kwargs=kw, backend=backend)
    (g_packed,) = torch.autograd.grad(packed, pred)
    (g_unpacked,) = torch.autograd.grad(unpacked, pred)
    assert packed > 0
    assert_close(packed, unpacked, rtol=1e-6, atol=0, what="loss")
    assert_close(g_packed, g_unpacked, rtol=1e-5, atol=1e-7 * float(g_unpacked.abs().max()), what="grad")


def test_checkpointed_flux_teacher_gives_the_same_loss_and_gradient(gen):
    arch, layers = ARCHS["flux"], ("transformer_blocks.1", "single_transformer_blocks.1")
    model, schedule = arch.make(), NoiseSchedule.scaled_linear()
    plain, ckpt = FrozenTeacher(model, layers), FrozenTeacher(model, layers, checkpoint=True)
    # One checkpoint per block up to the deepest tap; leaves (x_embedder, context_embedder: a Linear each)
    # and the weightless rotary embedding are skipped.
    assert ckpt.truncated and ckpt.checkpoint_units == (
        "time_text_embed", "transformer_blocks.0", "transformer_blocks.1", "single_transformer_blocks.0",
        "single_transformer_blocks.1")
    x0, noise, pred, t, t2, kw = loss_inputs(arch, gen)
    results = []
    for teacher in (plain, ckpt):
        loss = self_perceptual_loss(teacher, pred, x0, noise, t, schedule, timesteps_prime=t2, teacher_kwargs=kw)
        results.append((loss, torch.autograd.grad(loss, pred)[0]))
    (loss, grad), (loss_c, grad_c) = results
    assert loss > 0 and grad.abs().sum() > 0
    assert_close(loss_c, loss, rtol=1e-6, atol=1e-9, what="loss")
    assert_close(grad_c, grad, rtol=1e-5, atol=1e-9, what="grad")


@pytest.mark.parametrize("name", ["sd3", "flux"])
def test_compiling_the_loss_with_a_truncated_transformer_teacher_breaks_no_graph_in_fastperc(name, gen):
    torch._dynamo.reset()
    arch = ARCHS[name]
    teacher = FrozenTeacher(arch.make(), LOSS_CASES[name])
    assert teacher.truncated
    schedule = NoiseSchedule.scaled_linear()
    x0, noise, pred, t, t2, kw = loss_inputs(arch, gen)

    def step(p):
        return self_perceptual_loss(teacher, p, x0, noise, t, schedule, timesteps_prime=t2, teacher_kwargs=kw)

    explanation = torch._dynamo.explain(step)(pred)
    here = os.path.dirname(fastperc.__file__)
    from_fastperc = [r for r in explanation.break_reasons
                     if r.user_stack and r.user_stack[-1].filename.startswith(here)]
    assert not from_fastperc, [(r.reason, r.user_stack[-1]) for r in from_fastperc]
    # diffusers' SD3 and Flux blocks trace without a break too, as of diffusers 0.42: one graph.
    assert explanation.graph_break_count == 0, [(r.reason, r.user_stack[-1:]) for r in explanation.break_reasons]


# ---- other transformers, defaults, copies -------------------------------------------------------------

class SiTBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.ada = nn.Linear(dim, 2 * dim)

    def forward(self, x, c):
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return x + self.mlp(self.norm(x) * (1 + scale[:, None]) + shift[:, None])


class TinySiT(nn.Module):
    """SiT/DiT-style code (no adapter): forward(x, t, y) with a continuous time t in [0, 1]."""

    def __init__(self, dim=16, depth=6, classes=10):
        super().__init__()
        self.x_embedder = nn.Linear(4 * 2 * 2, dim)
        self.t_embedder, self.y_embedder = nn.Linear(1, dim), nn.Embedding(classes, dim)
        self.blocks = nn.ModuleList(SiTBlock(dim) for _ in range(depth))
        self.final_layer = nn.Linear(dim, 4 * 2 * 2)
        self.gradient_checkpointing = False

    def forward(self, x, t, y):
        b, c, h, w = x.shape
        tokens = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, -1, c * 4)
        h_ = self.x_embedder(tokens)
        cond = self.t_embedder(t[:, None].float()) + self.y_embedder(y)
        for block in self.blocks:
            if self.gradient_checkpointing and torch.is_grad_enabled():
                h_ = torch.utils.checkpoint.checkpoint(block, h_, cond, use_reentrant=False)
            else:
                h_ = block(h_, cond)
        return self.final_layer(h_)


class TextFirstTransformer(TinySiT):
    """A forward that takes encoder_hidden_states second, as PixArt/SD3/Flux do: a positional timestep
    would land there."""

    def forward(self, hidden_states, encoder_hidden_states=None, timestep=None, class_labels=None):
        assert encoder_hidden_states is not None and encoder_hidden_states.dim() == 3
        return super().forward(hidden_states + encoder_hidden_states.mean((1, 2))[:, None, None, None], timestep,
                               class_labels)


@pytest.mark.parametrize("cls, time_kw, extra", [(TinySiT, "t", {}),
                                                 (TextFirstTransformer, "timestep", {"text": True})])
def test_a_transformer_without_adapter_uses_the_hook_path_with_keyword_arguments(cls, time_kw, extra, gen):
    model = cls().eval()
    teacher = FrozenTeacher(model, ("blocks.1", "blocks.3"))
    assert not teacher.truncated and teacher.layers == ("blocks.1", "blocks.3")
    calls, counts = [], {}
    teacher.model.register_forward_pre_hook(lambda m, args, kw: calls.append((len(args), sorted(kw))),
                                            with_kwargs=True)
    for i in range(6):
        teacher.model.blocks[i].register_forward_pre_hook(lambda m, a, i=i: counts.__setitem__(i, counts.get(i, 0) + 1))
    x, t = torch.randn(B, 4, 8, 8, generator=gen), torch.rand(B, generator=gen)
    labels = torch.randint(0, 10, (B,), generator=gen)
    kw = {"encoder_hidden_states": torch.randn(B, 5, 7, generator=gen), "class_labels": labels} if extra else \
        {"y": labels}
    with torch.no_grad():
        feats = teacher(x, t, **kw)
        want = full_forward_features(model, ("blocks.1", "blocks.3"), x, t, **kw) if time_kw == "timestep" else None
    assert calls == [(1, sorted([time_kw, *kw]))]  # the sample positional, everything else by name
    assert counts == {0: 1, 1: 1, 2: 1, 3: 1}  # blocks.4 and .5 never ran
    if want is None:
        with torch.no_grad():
            h, ref = model.x_embedder(x.view(B, 4, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(B, 16, 16)), []
            cond = model.t_embedder(t[:, None]) + model.y_embedder(labels)
            for block in model.blocks[:4]:
                h = block(h, cond)
                ref.append(h)
        want = [ref[1], ref[3]]
    assert all(torch.equal(f, w) for f, w in zip(feats, want))


def test_default_layers_are_the_midblock_for_unets_and_a_mid_depth_block_for_transformers():
    from .helpers import tiny_unet
    from .test_diffusers import cond_unet
    assert default_layers(tiny_unet()) == ("mid_block",) and FrozenTeacher(tiny_unet()).layers == ("mid_block",)
    assert default_layers(cond_unet()) == ("mid_block",)
    assert default_layers(dit()) == ("transformer_blocks.1",)  # 4 blocks: the last of the first half
    assert default_layers(sd3()) == ("transformer_blocks.1",)
    assert default_layers(flux()) == ("transformer_blocks.1",)  # 2 joint + 3 single: block 2 of 5
    assert default_layers(flux_big := FluxTransformer2DModel(
        num_layers=3, num_single_layers=6, attention_head_dim=8, num_attention_heads=2, in_channels=16,
        joint_attention_dim=12, pooled_projection_dim=6, axes_dims_rope=(2, 2, 4))) == ("single_transformer_blocks.0",)
    assert default_layers(TinySiT(depth=8)) == ("blocks.3",)
    assert FrozenTeacher(torch.compile(TinySiT())).layers == ("blocks.2",)
    teacher = FrozenTeacher(flux_big, layers=None)
    assert teacher.layers == ("single_transformer_blocks.0",) and teacher.truncated
    with pytest.raises(ValueError, match="no `mid_block` and no list of blocks"):
        FrozenTeacher(nn.Linear(3, 3))
    # SelfPerceptualLoss's ("mid_block",) on a transformer: the error says what layers=None would tap.
    with pytest.raises(ValueError, match=r"unknown layer 'mid_block'.*pass layers=None .*'transformer_blocks.1'"):
        FrozenTeacher(sd3(), ("mid_block",))


@pytest.mark.parametrize("make", [sd3, flux, dit, pixart, TinySiT])
def test_a_copied_teacher_has_gradient_checkpointing_off_and_the_original_keeps_it(make, gen):
    model = make()
    if isinstance(model, TinySiT):
        model.gradient_checkpointing = True
    else:
        model.enable_gradient_checkpointing()
    on = lambda m: any(getattr(x, "gradient_checkpointing", False) is True for x in m.modules())  # noqa: E731
    teacher = FrozenTeacher(model)
    assert on(model) and not on(teacher.model)
    if not isinstance(model, TinySiT):
        assert model.is_gradient_checkpointing and not teacher.model.is_gradient_checkpointing
    assert on(FrozenTeacher(model, copy=False).model)  # not a copy: the caller's model is left as it is
