"""The shared-weights teacher of a LoRA student (`FrozenTeacher(model, copy=False, adapters_off=True)`): the
model being trained, run with its peft adapters off, is the teacher. Its features are the base model's,
nothing is copied, gradients reach only the LoRA weights, and the model's mode and adapters come back."""
from __future__ import annotations

import pytest
import torch

from fastperc import FrozenTeacher, InputError, NoiseSchedule, self_perceptual_loss

from .test_diffusers import cond_unet

# peft takes seconds to import (it loads transformers): these run in the slow suite, and import it there.
pytestmark = pytest.mark.slow


def lora_unet(rank: int = 4):
    """A UNet2DConditionModel with LoRA on its attention projections (as diffusers' LoRA scripts add it),
    the LoRA B matrices drawn non-zero so that the adapters change the output."""
    peft = pytest.importorskip("peft")
    unet = cond_unet()
    unet.requires_grad_(False)
    unet.add_adapter(peft.LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                     target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return unet


def inputs(gen, b=2):
    return (torch.randn(b, 4, 8, 8, generator=gen), torch.tensor([3, 700][:b]),
            {"encoder_hidden_states": torch.randn(b, 5, 16, generator=gen)})


def test_the_teacher_gives_the_base_models_features_while_the_student_keeps_its_adapters(gen):
    unet = lora_unet().train()
    teacher = FrozenTeacher(unet, copy=False, adapters_off=True)
    x, t, kw = inputs(gen)
    with torch.no_grad():
        got = teacher(x, t, **kw)[0]
        assert unet.training  # back in the trainer's mode
        unet.eval()
        unet.disable_adapters()
        base = FrozenTeacher(unet, copy=True)(x, t, **kw)[0]  # the base weights, copied: the ground truth
        unet.enable_adapters()
        with_adapters = FrozenTeacher(unet, copy=True, prune=False)  # a copy keeps the adapters on
        on = with_adapters(x, t, **kw)[0]
    assert torch.equal(got, base) and not torch.allclose(got, on)
    assert all(p.requires_grad == ("lora_" in n) for n, p in unet.named_parameters())  # nothing frozen


def test_nothing_is_copied_and_the_model_is_not_a_part_of_the_teacher():
    unet = lora_unet()
    teacher = FrozenTeacher(unet, copy=False, adapters_off=True)
    assert teacher.model is unet and teacher.held_bytes == 0 and teacher.held_parameters == 0
    assert list(teacher.parameters()) == [] and "adapters_off=True" in repr(teacher)
    teacher.train()  # a parent module's .train() reaches the teacher, never the model
    unet.train()
    teacher.eval()
    assert unet.training


def test_gradients_reach_only_the_lora_weights(gen):
    unet = lora_unet().train()
    teacher = FrozenTeacher(unet, copy=False, adapters_off=True)
    schedule = NoiseSchedule.scaled_linear()
    x0, _, kw = inputs(gen)
    noise = torch.randn(x0.shape, generator=gen)
    t, t2 = torch.tensor([10, 600]), torch.tensor([50, 300])
    pred = unet(schedule.add_noise(x0, noise, t), t, **kw).sample
    loss = self_perceptual_loss(teacher, pred, x0, noise, t, schedule, timesteps_prime=t2, teacher_kwargs=kw)
    loss.backward()
    with_grad = {n for n, p in unet.named_parameters() if p.grad is not None}
    lora = {n for n, p in unet.named_parameters() if "lora_" in n}
    assert with_grad == lora and all(unet.get_parameter(n).grad.abs().sum() > 0 for n in lora)


def test_the_adapters_come_back_on_even_when_the_teacher_call_fails(gen):
    unet = lora_unet().train()
    teacher = FrozenTeacher(unet, copy=False, adapters_off=True)
    x, t, kw = inputs(gen)
    with torch.no_grad():
        before = unet(x, t, **kw).sample
    with pytest.raises(RuntimeError):
        teacher(x, t, encoder_hidden_states=torch.randn(2, 5, 7))  # a wrong conditioning width
    assert unet.training
    with torch.no_grad():
        assert torch.equal(unet(x, t, **kw).sample, before)  # the adapters are on again


def test_adapters_off_needs_the_model_itself_with_adapters_and_nothing_that_changes_it():
    unet = lora_unet()
    with pytest.raises(InputError, match="adapters_off: .*pass copy=False"):
        FrozenTeacher(unet, adapters_off=True)
    with pytest.raises(InputError, match="adapters_off: dtype, fp8 and checkpoint"):
        FrozenTeacher(unet, copy=False, adapters_off=True, dtype=torch.bfloat16)
    with pytest.raises(InputError, match="adapters_off: dtype, fp8 and checkpoint"):
        FrozenTeacher(unet, copy=False, adapters_off=True, checkpoint=True)
    with pytest.raises(InputError, match="adapters_off: UNet2DConditionModel has no peft adapters"):
        FrozenTeacher(cond_unet(), copy=False, adapters_off=True)
    with pytest.raises(TypeError, match="adapters_off: expected a bool"):
        FrozenTeacher(unet, copy=False, adapters_off="yes")
