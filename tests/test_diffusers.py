"""The objective on randomly initialised diffusers UNets (no downloads)."""
import pytest
import torch
from diffusers import UNet2DConditionModel, UNet2DModel

from fastperc import FrozenTeacher, NoiseSchedule, self_perceptual_loss

from .helpers import features_by_hooks


def cond_unet():
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, attention_head_dim=4, norm_num_groups=8)


def plain_unet():
    return UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8)


CASES = {
    "cond": (cond_unet, (2, 4, 8, 8), lambda: {"encoder_hidden_states": torch.randn(2, 5, 16)}),
    "plain": (plain_unet, (2, 3, 8, 8), lambda: {}),
}
LAYERS = [("mid_block",), ("down_blocks.0", "mid_block"), ("mid_block.resnets.0",), ("up_blocks.0", "mid_block")]


@pytest.mark.parametrize("arch", CASES)
@pytest.mark.parametrize("layers", LAYERS)
def test_teacher_features_match_full_forward(arch, layers):
    make, shape, kwargs = CASES[arch]
    model = make().eval()
    teacher = FrozenTeacher(model, layers)
    x, t, kw = torch.randn(shape), torch.randint(0, 1000, (2,)), kwargs()
    for got, want in zip(teacher(x, t, **kw), features_by_hooks(model, layers, x, t, **kw)):
        assert torch.allclose(got, want, atol=1e-6)
    # Hook-free only when every tap is a stage output (a decoder tap or a nested one uses hooks).
    assert teacher.truncated == ("up_blocks.0" not in layers and "mid_block.resnets.0" not in layers)


@pytest.mark.parametrize("arch", CASES)
def test_midblock_teacher_never_runs_the_decoder(arch):
    make, shape, kwargs = CASES[arch]
    teacher = FrozenTeacher(make(), prune=False)  # truncation alone: nothing pruned to call
    calls = []
    for name in ("up_blocks.0", "up_blocks.1", "conv_out"):
        dict(teacher.model.named_modules())[name].register_forward_pre_hook(lambda m, a, n=name: calls.append(n))
    teacher(torch.randn(shape), torch.tensor([3, 900]), **kwargs())
    assert calls == []


@pytest.mark.parametrize("arch", CASES)
@pytest.mark.parametrize("layers", [("mid_block",), ("down_blocks.1", "mid_block")])
def test_loss_trains_a_diffusers_student(arch, layers):
    make, shape, kwargs = CASES[arch]
    schedule = NoiseSchedule.scaled_linear()
    student = make()
    teacher = FrozenTeacher(student, layers)
    x0, noise = torch.randn(shape), torch.randn(shape)
    t = torch.randint(0, 1000, (2,))
    kw = kwargs()
    pred = student(schedule.add_noise(x0, noise, t), t, **kw).sample
    loss = self_perceptual_loss(teacher, pred, x0, noise, t, schedule, teacher_kwargs=kw)
    loss.backward()
    assert torch.isfinite(loss) and loss > 0
    assert student.conv_in.weight.grad is not None and student.conv_in.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())


def test_text_conditioning_changes_the_loss():
    schedule = NoiseSchedule.scaled_linear()
    teacher = FrozenTeacher(cond_unet())
    x0, noise, p = torch.randn(3, 2, 4, 8, 8).unbind(0)
    t, t2 = torch.randint(0, 1000, (2,)), torch.randint(0, 1000, (2,))
    losses = [self_perceptual_loss(teacher, p, x0, noise, t, schedule, timesteps_prime=t2,
                                   teacher_kwargs={"encoder_hidden_states": torch.randn(2, 5, 16)}) for _ in range(2)]
    assert not torch.equal(losses[0], losses[1])
