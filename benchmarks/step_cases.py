"""Training-step cases for bench_step.py: one student step (forward + loss + backward) per objective.

Objectives, all on the same student, teacher weights and batch:
  mse           plain MSE on the v-prediction target (the baseline)
  naive         self-perceptual written the obvious way: two full teacher forwards, a forward hook
                capturing the midblock, F.mse_loss
  trick         the well-known truncation trick: the same, with a hook that raises after the midblock
  fastperc      fastperc.self_perceptual_loss (truncated teacher, fused ops)
  checkpointed  fastperc with FrozenTeacher(checkpoint=True)
  fastperc-quarter   fastperc on a quarter of the batch (batch_fraction=0.25; MSE on the rest)
  4tap, 4tap-quarter the search's best configuration (conv_in, down_blocks.0, down_blocks.1, mid_block;
                channel RMS; t' in [0, 100]) on the whole batch and on a quarter
  mse-compiled, fastperc-compiled   torch.compile of student forward + loss (backward compiled by AOTAutograd)

Models: "default" (fastperc's UNet, 1x32x32, 10 classes), "sd-like" (a diffusers UNet2DConditionModel
64/128/128 with cross-attention, 4x32x32 latents) and "sd" (Stable Diffusion 1.5/2.1 block widths
320/640/1280/1280 with cross-attention, 4x64x64 latents). Both are diffusers' UNet when diffusers is
installed, else fastperc's UNet at those widths, class-conditional instead of cross-attention.
"""
from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch
import torch.nn.functional as F

OBJECTIVES = ("mse", "naive", "trick", "fastperc", "checkpointed", "fastperc-quarter", "4tap", "4tap-quarter",
              "mse-compiled", "fastperc-compiled")
FOUR_TAPS = ("conv_in", "down_blocks.0", "down_blocks.1", "mid_block")


@dataclass
class Setup:
    student: torch.nn.Module
    x0: torch.Tensor
    kwargs: dict        # conditioning passed to student and teacher alike
    description: str


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


def build(model: str, device: torch.device, batch: int) -> Setup:
    torch.manual_seed(0)
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
    raise ValueError(f"model: expected 'default', 'sd-like' or 'sd', got {model!r}")


class _Stop(Exception):
    pass


def _hooked_features(teacher, layer: str, sample, t, kwargs, stop: bool) -> torch.Tensor:
    """The obvious implementations: a forward hook on `layer`; `stop` raises from it (the trick)."""
    box = {}

    def hook(module, args, output):
        box["f"] = output[0] if isinstance(output, tuple) else output
        if stop:
            raise _Stop

    handle = dict(teacher.named_modules())[layer].register_forward_hook(hook)
    try:
        teacher(sample, t, **kwargs)
    except _Stop:
        pass
    finally:
        handle.remove()
    return box["f"]


def make_step(objective: str, setup: Setup, autocast_dtype: torch.dtype | None, backend: str = "auto"):
    """A closure running one step; the student's gradients are dropped after each step. On the meta
    device (the FLOP count) the draws are made on the CPU and moved."""
    from fastperc import FrozenTeacher, NoiseSchedule, TimestepDistribution, self_perceptual_loss

    device = setup.x0.device
    schedule = NoiseSchedule.scaled_linear()
    student, x0, kw = setup.student, setup.x0, setup.kwargs
    batch = x0.shape[0]
    check = device.type != "meta"  # value checks read data: a meta tensor has none
    gen = torch.Generator(device="cpu" if device.type == "meta" else device).manual_seed(1)
    noise = torch.randn(x0.shape, generator=gen, device=gen.device).to(device)
    t = torch.randint(0, 1000, (batch,), generator=gen, device=gen.device).to(device)
    t2 = torch.randint(0, 1000, (batch,), generator=gen, device=gen.device).to(device)
    base = objective.removesuffix("-compiled")
    share = 0.25 if base.endswith("-quarter") else 1.0
    base = base.removesuffix("-quarter")
    options = {}
    if base == "4tap":
        low_t2 = TimestepDistribution(0, 100).sample(batch, 1000, gen).to(device)
        options = dict(feature_norm="channel_rms")

    if base in ("naive", "trick"):
        plain_teacher = copy.deepcopy(student).eval().requires_grad_(False)
    elif base in ("fastperc", "checkpointed", "4tap"):
        extra = {"checkpoint": True} if base == "checkpointed" else {}
        teacher = FrozenTeacher(student, FOUR_TAPS if base == "4tap" else ("mid_block",), **extra)

    def loss_of(v):
        if base == "mse":
            return F.mse_loss(v.float(), schedule.velocity(x0, noise, t).float())
        if base in ("fastperc", "checkpointed", "4tap"):
            return self_perceptual_loss(teacher, v, x0, noise, t, schedule, timesteps_prime=low_t2 if base == "4tap"
                                        else t2, teacher_kwargs=kw, batch_fraction=share, backend=backend, **options)
        # naive / trick: re-noise by hand, as a user would write it
        x_t = schedule.add_noise(x0, noise, t, check=check)
        x0_hat, eps_hat = schedule.convert(x_t, v.float(), t)
        fake = schedule.add_noise(x0_hat, eps_hat, t2, check=check)
        with torch.no_grad():
            real_f = _hooked_features(plain_teacher, "mid_block", schedule.add_noise(x0, noise, t2, check=check), t2, kw,
                                      stop=base == "trick")
        fake_f = _hooked_features(plain_teacher, "mid_block", fake, t2, kw, stop=base == "trick")
        return F.mse_loss(fake_f.float(), real_f.float())

    def autocast():  # no autocast context at all without a dtype: the meta device has none
        return torch.autocast(device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()

    def forward_loss():
        with autocast():
            v = student(schedule.add_noise(x0, noise, t, check=check), t, **kw)
            v = v.sample if hasattr(v, "sample") else v
            return loss_of(v)

    if objective.endswith("-compiled"):
        # Every case's forward_loss is the same code object: without a reset, dynamo's recompile
        # limit is reached after 8 cases and the later ones silently run eagerly.
        torch._dynamo.reset()
        fwd = torch.compile(forward_loss)
    else:
        fwd = forward_loss

    def step():
        loss = fwd()
        loss.backward()
        student.zero_grad(set_to_none=True)
        return loss

    return step


def flop_floor(objective: str, model: str, batch: int, side: int | None = None) -> int:
    """The FLOPs of one step of `objective` (student forward + backward, the teacher on both branches, the
    fake branch's input-gradient backward), counted by torch.utils.flop_counter.FlopCounterMode on the
    meta device: matmuls, convolutions and attention only (elementwise work, norms and the fused ops are
    not counted). The same for every dtype and for a compiled step."""
    from torch.utils.flop_counter import FlopCounterMode
    setup = build(model, torch.device("meta"), batch)
    if side is not None:  # the benchmark's --quick crop
        setup.x0 = setup.x0[:, :, :side, :side].contiguous()
    step = make_step(objective.removesuffix("-compiled"), setup, None, backend="reference")
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()
