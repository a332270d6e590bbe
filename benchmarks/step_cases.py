"""Training-step cases for bench_step.py: one student step (forward + loss + backward) per objective.

Objectives, all on the same student, teacher weights and batch:
  mse           plain MSE on the v-prediction target (the baseline)
  naive         self-perceptual written the obvious way: two full teacher forwards, a forward hook
                capturing the midblock, F.mse_loss
  trick         the well-known truncation trick: the same, with a hook that raises after the midblock
  fastperc      fastperc.self_perceptual_loss (truncated teacher, fused ops); the teacher holds the
                student's fp32 weights (autocast casts them per call)
  fastperc-bf16 the same with a bf16 teacher (FrozenTeacher(dtype=torch.bfloat16))
  fastperc-fp8  the same with an FP8 teacher (FrozenTeacher(fp8=True): Linear layers in FP8, the rest bf16)
  checkpointed  fastperc with FrozenTeacher(checkpoint=True)
  fastperc-quarter   fastperc on a quarter of the batch (batch_fraction=0.25; MSE on the rest)
  4tap, 4tap-quarter, 4tap-half   the search's best configuration (conv_in, down_blocks.0, down_blocks.1,
                mid_block; channel RMS; t' in [0, 100]) on the whole batch, a quarter and half of it
  3tap          the same without the midblock tap: the teacher stops after down_blocks.1
  4tap-bf16     4tap with a bf16 teacher (the cheaper forms: docs/studies/k_cheaper.toml, timed by
                quality_per_compute.py)
  mse-compiled, fastperc-compiled   torch.compile of student forward + loss (backward compiled by AOTAutograd)

Models: "default" (fastperc's UNet, 1x32x32, 10 classes), "sd-like" (a diffusers UNet2DConditionModel
64/128/128 with cross-attention, 4x32x32 latents) and "sd" (Stable Diffusion 1.5/2.1 block widths
320/640/1280/1280 with cross-attention, 4x64x64 latents: 512 px). Both are diffusers' UNet when diffusers
is installed, else fastperc's UNet at those widths, class-conditional instead of cross-attention. The UNets
train on the scaled-linear schedule (v-prediction) and are tapped at the midblock.
"sd3-512" and "sd3-1024": diffusers' SD3Transformer2DModel in SD3-medium's published configuration (2.0 B
parameters; 16x64x64 and 16x128x128 latents, 333 text tokens of width 4096) on flow matching (shift 3),
tapped at its default mid-depth block (transformer_blocks.11); "sd3-tiny" the same family at toy size (the
dry run). The SD3 cases need diffusers.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from teacher_memory import SD3_MEDIUM

OBJECTIVES = ("mse", "naive", "trick", "fastperc", "fastperc-bf16", "fastperc-fp8", "checkpointed", "fastperc-quarter",
              "4tap", "4tap-quarter", "4tap-half", "3tap", "4tap-bf16", "mse-compiled", "fastperc-compiled")
# The cheaper forms of the search's configuration: measured on request, not in every default run.
CHEAPER_FORMS = ("4tap-half", "3tap", "4tap-bf16")
SD3_MODELS = ("sd3-512", "sd3-1024", "sd3-tiny")
SD3_TINY = dict(sample_size=16, patch_size=2, in_channels=16, num_layers=4, attention_head_dim=16, num_attention_heads=2,
                joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, out_channels=16,
                pos_embed_max_size=16)
# Per model: the latent side, the text tokens (SD3: 77 CLIP + 256 T5) and the default batch people train with.
SD3_SHAPES = {"sd3-512": (64, 333, 8), "sd3-1024": (128, 333, 4), "sd3-tiny": (8, 7, 2)}


def default_objectives(model: str) -> tuple[str, ...]:
    """The rows a model gets by default: the UNets every objective; SD3 the teachers that matter at its size."""
    if model in SD3_MODELS:
        return ("mse", "trick", "fastperc-bf16", "fastperc-fp8")
    return tuple(o for o in OBJECTIVES if o not in ("fastperc-bf16", "fastperc-fp8", *CHEAPER_FORMS))
FOUR_TAPS = ("conv_in", "down_blocks.0", "down_blocks.1", "mid_block")
TAPS = {"4tap": FOUR_TAPS, "3tap": FOUR_TAPS[:3]}  # the search's taps; 3tap stops before the midblock
SHARES = {"-quarter": 0.25, "-half": 0.5}  # the objective's share of the batch (MSE on the rest)


@dataclass
class Setup:
    student: torch.nn.Module
    x0: torch.Tensor
    kwargs: dict        # conditioning passed to student and teacher alike
    description: str
    flow: bool = False  # flow matching (SD3) instead of the scaled-linear v-prediction schedule
    layer: str = "mid_block"  # the tap of the single-tap objectives

    def schedule(self):
        from fastperc import FlowMatchingSchedule, NoiseSchedule
        return FlowMatchingSchedule(shift=3.0) if self.flow else NoiseSchedule.scaled_linear()


def _diffusers_unet(widths, cross_dim: int, head_dim: int, layers: int, device):
    from diffusers import UNet2DConditionModel
    n = len(widths)
    down = ["CrossAttnDownBlock2D"] * (n - 1) + ["DownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (n - 1)
    with torch.device(device):  # parameters are created on the device: an SD-sized init on CPU takes long
        return UNet2DConditionModel(sample_size=32, in_channels=4, out_channels=4, block_out_channels=widths,
                                    down_block_types=down, up_block_types=up, layers_per_block=layers,
                                    cross_attention_dim=cross_dim, attention_head_dim=head_dim,
                                    norm_num_groups=32 if min(widths) >= 32 else 8)


def _sd3(model: str, device: torch.device, batch: int) -> Setup:
    from diffusers import SD3Transformer2DModel
    from fastperc.teacher import default_layers
    config = SD3_TINY if model == "sd3-tiny" else SD3_MEDIUM
    side, tokens, _ = SD3_SHAPES[model]
    with torch.device(device):
        student = SD3Transformer2DModel(**config)
    x0 = torch.randn(batch, config["in_channels"], side, side, device=device)
    kwargs = {"encoder_hidden_states": torch.randn(batch, tokens, config["joint_attention_dim"], device=device),
              "pooled_projections": torch.randn(batch, config["pooled_projection_dim"], device=device)}
    params = sum(p.numel() for p in student.parameters())
    return Setup(student, x0, kwargs, f"diffusers SD3Transformer2DModel ({model}: {params / 1e6:.0f} M params, "
                                      f"{config['num_layers']} blocks), batch {batch}, {config['in_channels']}x{side}x{side}"
                                      f", {tokens} text tokens, flow matching", flow=True,
                 layer=default_layers(student)[0])


def default_batch(model: str) -> int:
    return 32 if model == "default" else SD3_SHAPES[model][2] if model in SD3_MODELS else 8


def build(model: str, device: torch.device, batch: int) -> Setup:
    torch.manual_seed(0)
    if model in SD3_MODELS:
        return _sd3(model, device, batch)
    if model == "default":
        from fastperc.models import UNet
        student = UNet(num_classes=10).to(device)
        x0 = torch.rand(batch, 1, 32, 32, device=device) * 2 - 1
        kwargs = {"class_labels": torch.randint(0, 10, (batch,), device=device)}
        return Setup(student, x0, kwargs, f"fastperc UNet (default), batch {batch}, 1x32x32")
    if model in ("sd-like", "sd"):
        try:
            import diffusers  # noqa: F401
        except ImportError:
            diffusers = None
        side = 32 if model == "sd-like" else 64
        widths, cross, head = ((64, 128, 128), 64, 8) if model == "sd-like" else ((320, 640, 1280, 1280), 768, 8)
        x0 = torch.randn(batch, 4, side, side, device=device)
        if diffusers is None:  # the same widths in fastperc's own UNet, class-conditional instead of text
            from fastperc.models import UNet
            student = UNet(in_channels=4, block_channels=widths, num_classes=10).to(device)
            kwargs = {"class_labels": torch.randint(0, 10, (batch,), device=device)}
            return Setup(student, x0, kwargs, f"fastperc UNet {widths}, batch {batch}, 4x{side}x{side}")
        student = _diffusers_unet(widths, cross, head, 2 if model == "sd" else 1, device)
        kwargs = {"encoder_hidden_states": torch.randn(batch, 77, cross, device=device)}
        return Setup(student, x0, kwargs, f"diffusers UNet2DConditionModel {widths} + cross-attention "
                                          f"({sum(p.numel() for p in student.parameters()) / 1e6:.0f} M params), "
                                          f"batch {batch}, 4x{side}x{side}")
    raise ValueError(f"model: expected default, sd-like, sd, {', '.join(SD3_MODELS)}, got {model!r}")


class _Stop(Exception):
    pass


def _hooked_features(teacher, layer: str, sample, t, kwargs, stop: bool) -> torch.Tensor:
    """The obvious implementations: a forward hook on `layer`; `stop` raises from it (the trick). A joint
    text-image block (SD3) returns (text, image): its image stream is the feature."""
    box = {}

    def hook(module, args, output):
        box["f"] = (output[-1] if type(module).__name__ == "JointTransformerBlock" else output[0]) \
            if isinstance(output, tuple) else output
        if stop:
            raise _Stop

    handle = dict(teacher.named_modules())[layer].register_forward_hook(hook)
    try:
        teacher(sample, timestep=t, **kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return box["f"]


def make_step(objective: str, setup: Setup, autocast_dtype: torch.dtype | None, backend: str = "auto",
              compile_backend: str = "inductor"):
    """A closure running one step; the student's gradients are dropped after each step. On the meta
    device (the FLOP count) the draws are made on the CPU and moved. `compile_backend`: torch.compile's
    backend for the -compiled objectives (aot_eager traces the same graphs without generating code: the
    dry run's quick stand-in)."""
    from fastperc import FrozenTeacher, TimestepDistribution, self_perceptual_loss

    device = setup.x0.device
    schedule = setup.schedule()
    student, x0, kw = setup.student, setup.x0, setup.kwargs
    batch = x0.shape[0]
    check = device.type != "meta"  # value checks read data: a meta tensor has none
    gen = torch.Generator(device="cpu" if device.type == "meta" else device).manual_seed(1)
    noise = torch.randn(x0.shape, generator=gen, device=gen.device).to(device)
    table = schedule.timesteps  # the loss's timesteps: DDPM indices, or sigma * 1000 for flow matching
    t = table[torch.randint(0, len(table), (batch,), generator=gen, device=gen.device)].to(device)
    t2 = table[torch.randint(0, len(table), (batch,), generator=gen, device=gen.device)].to(device)
    base = objective.removesuffix("-compiled")
    share = next((f for suffix, f in SHARES.items() if base.endswith(suffix)), 1.0)
    for suffix in SHARES:
        base = base.removesuffix(suffix)
    taps = TAPS.get(base.removesuffix("-bf16"))
    options = {}
    if taps:
        if setup.flow:
            raise ValueError(f"{base}: the UNet taps ({', '.join(taps)}); not for SD3")
        t2 = TimestepDistribution(0, 100).sample(batch, 1000, gen).to(device)
        options = dict(feature_norm="channel_rms")

    teacher_options = {"checkpointed": {"checkpoint": True}, "fastperc-bf16": {"dtype": torch.bfloat16},
                       "4tap-bf16": {"dtype": torch.bfloat16}, "fastperc-fp8": {"fp8": True}}
    fastperc_objective = base in ("fastperc", *TAPS, *teacher_options)
    if base in ("naive", "trick"):
        plain_teacher = copy.deepcopy(student).eval().requires_grad_(False)
    elif fastperc_objective:
        teacher = FrozenTeacher(student, taps or (setup.layer,), **teacher_options.get(base, {}))
    elif base != "mse":
        raise ValueError(f"objective: expected one of {', '.join(OBJECTIVES)}, got {objective!r}")

    def loss_of(v):
        if base == "mse":
            return F.mse_loss(v.float(), schedule.target(x0, noise, t).float())
        if fastperc_objective:
            return self_perceptual_loss(teacher, v, x0, noise, t, schedule, timesteps_prime=t2, teacher_kwargs=kw,
                                        batch_fraction=share, backend=backend, **options)
        # naive / trick: re-noise by hand, as a user would write it
        x_t = schedule.add_noise(x0, noise, t, check=check)
        x0_hat, eps_hat = schedule.convert(x_t, v.float(), t)
        fake = schedule.add_noise(x0_hat, eps_hat, t2, check=check)
        with torch.no_grad():
            real_f = _hooked_features(plain_teacher, setup.layer, schedule.add_noise(x0, noise, t2, check=check), t2,
                                      kw, stop=base == "trick")
        fake_f = _hooked_features(plain_teacher, setup.layer, fake, t2, kw, stop=base == "trick")
        return F.mse_loss(fake_f.float(), real_f.float())

    def autocast():  # no autocast context at all without a dtype: the meta device has none
        return torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()

    def forward_loss():
        with autocast():
            v = student(schedule.add_noise(x0, noise, t, check=check), timestep=t, **kw)
            v = v.sample if hasattr(v, "sample") else v
            return loss_of(v)

    if objective.endswith("-compiled"):
        # Every case's forward_loss is the same code object: without a reset, dynamo's recompile
        # limit is reached after 8 cases and the later ones silently run eagerly.
        torch._dynamo.reset()
        fwd = torch.compile(forward_loss, backend=compile_backend)
    else:
        fwd = forward_loss

    def step():
        loss = fwd()
        loss.backward()
        student.zero_grad(set_to_none=True)
        return loss

    return step


def flop_floor(objective: str, model: str, batch: int, side: int | None = None) -> float:
    """The work of one step of `objective` (student forward + backward, the teacher on both branches, the
    fake branch's input-gradient backward) in bf16-equivalent FLOPs, counted by
    torch.utils.flop_counter.FlopCounterMode on the meta device: matmuls, convolutions and attention only
    (elementwise work, norms and the fused ops are not counted). FP8 matmuls (torch._scaled_mm) count
    half: a GPU with FP8 runs them at twice its bf16 rate. The same for every dtype and for a compiled
    step."""
    setup = build(model, torch.device("meta"), batch)
    if side is not None:  # the benchmark's --quick crop
        setup.x0 = setup.x0[:, :, :side, :side].contiguous()
    return step_flops(objective, setup)


def step_flops(objective: str, setup: Setup) -> float:
    """flop_floor's count for a Setup already built on the meta device."""
    from torch.utils.flop_counter import FlopCounterMode
    step = make_step(objective.removesuffix("-compiled"), setup, None, backend="reference")
    with FlopCounterMode(display=False) as counter:
        step()
    fp8 = sum(n for op, n in counter.get_flop_counts().get("Global", {}).items() if "_scaled_mm" in str(op))
    return counter.get_total_flops() - fp8 / 2
