"""Drop-in as a diffusers user meets it: no silent traps, the scheduler they already have, wrapped
models, mixed precision, and errors that name the argument."""
from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import DDPMScheduler

import fastperc
from fastperc import FrozenTeacher, NoiseSchedule, SelfPerceptualLoss, self_perceptual_loss
from fastperc.loss import as_schedule

from .helpers import tiny_unet
from .test_diffusers import cond_unet


def _batch(b=2, shape=(1, 8, 8)):
    x0 = torch.randn(b, *shape)
    return x0, torch.randn_like(x0), torch.randint(0, 1000, (b,))


def test_the_student_passed_as_teacher_is_refused_and_left_trainable():
    student = tiny_unet()
    x0, noise, t = _batch()
    v = student(x0, t)
    with pytest.raises(ValueError, match="teacher: expected a frozen network.*is it the student"):
        self_perceptual_loss(student, v, x0, noise, t, NoiseSchedule.scaled_linear())
    assert all(p.requires_grad for p in student.parameters()) and student.training


def test_a_frozen_plain_module_is_accepted():
    frozen = tiny_unet().requires_grad_(False)
    x0, noise, t = _batch()
    loss = self_perceptual_loss(frozen, torch.randn_like(x0), x0, noise, t, NoiseSchedule.scaled_linear())
    assert torch.isfinite(loss)


def test_a_diffusers_scheduler_is_accepted_directly_and_converted_once():
    sched = DDPMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True, prediction_type="v_prediction")
    teacher = FrozenTeacher(tiny_unet())
    x0, noise, t = _batch()
    p, t2 = torch.randn_like(x0), torch.randint(0, 1000, (2,))
    a = self_perceptual_loss(teacher, p, x0, noise, t, sched, timesteps_prime=t2)
    b = self_perceptual_loss(teacher, p, x0, noise, t, NoiseSchedule.from_diffusers(sched), timesteps_prime=t2)
    assert torch.equal(a, b) and as_schedule(sched) is as_schedule(sched)
    crit = SelfPerceptualLoss(tiny_unet(), sched)
    assert crit.schedule.prediction_type == "v_prediction"


def test_epsilon_sd15_scheduler_gives_zero_loss_for_a_perfect_prediction():
    """The trap: a default (zero-SNR v-prediction) table against an SD 1.5 epsilon scheduler scored a
    perfect prediction 4e-3. With the scheduler passed, the loss is exactly what it should be."""
    sched = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)  # SD 1.5, epsilon
    teacher = FrozenTeacher(tiny_unet(dtype=torch.float64))
    x0, noise, t = (v.double() if v.is_floating_point() else v for v in _batch(4))
    loss = self_perceptual_loss(teacher, noise, x0, noise, t, sched, backend="reference")
    assert float(loss) < 1e-20


def test_module_without_a_schedule_warns_once_which_it_assumes(monkeypatch):
    monkeypatch.setattr(fastperc.loss, "_warned_default", False)
    with pytest.warns(RuntimeWarning, match="assumes NoiseSchedule.scaled_linear\\(\\).*v-prediction"):
        SelfPerceptualLoss(tiny_unet())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SelfPerceptualLoss(tiny_unet())


def test_epsilon_on_a_zero_snr_table_is_refused_when_the_loss_is_built():
    with pytest.raises(ValueError, match="prediction_type: 'epsilon' cannot be converted where alpha_t = 0"):
        SelfPerceptualLoss(tiny_unet(), NoiseSchedule.scaled_linear(), prediction_type="epsilon")


@pytest.mark.parametrize("wrap", ["compile", "data_parallel", "averaged", "frozen_teacher"])
def test_wrapped_teachers_are_unwrapped_and_keep_names_and_truncation(wrap):
    model = tiny_unet()
    wrapped = {"compile": lambda: torch.compile(model), "data_parallel": lambda: torch.nn.DataParallel(model),
               "averaged": lambda: torch.optim.swa_utils.AveragedModel(model),
               "frozen_teacher": lambda: FrozenTeacher(model)}[wrap]()
    prefix = {"compile": "_orig_mod.", "data_parallel": "module.", "averaged": "module.", "frozen_teacher": ""}[wrap]
    for layers in (("mid_block",), (prefix + "mid_block",)):
        teacher = FrozenTeacher(wrapped, layers)
        assert teacher.layers == ("mid_block",) and teacher.truncated
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([3, 400])
    assert torch.equal(teacher(x, t)[0], FrozenTeacher(model)(x, t)[0])


def test_a_diffusers_ema_model_is_a_clear_error():
    from diffusers.training_utils import EMAModel
    ema = EMAModel(tiny_unet().parameters())
    with pytest.raises(TypeError, match="EMAModel holds weights, not a network.*copy_to"):
        FrozenTeacher(ema)


def test_a_bf16_teacher_casts_every_floating_kwarg_and_keeps_timesteps():
    unet = cond_unet()
    teacher = FrozenTeacher(unet, dtype=torch.bfloat16)
    x0, noise, t = _batch(2, (4, 8, 8))
    text = torch.randn(2, 5, 16)  # fp32, as a text encoder gives it
    loss = self_perceptual_loss(teacher, torch.randn_like(x0), x0, noise, t, NoiseSchedule.scaled_linear(),
                                teacher_kwargs={"encoder_hidden_states": text})
    assert torch.isfinite(loss) and loss.dtype == torch.float32
    cast = fastperc.teacher.cast_floating({"a": text, "b": {"c": t, "d": text}, "e": [text], "f": 3}, torch.bfloat16)
    assert cast["a"].dtype == torch.bfloat16 and cast["b"]["c"].dtype == torch.long
    assert cast["b"]["d"].dtype == torch.bfloat16 and cast["e"][0].dtype == torch.bfloat16 and cast["f"] == 3


def test_missing_conditioning_is_named_before_the_teacher_runs():
    teacher = FrozenTeacher(cond_unet())
    calls = []
    teacher.model.conv_in.register_forward_hook(lambda *a: calls.append(1))
    x0, noise, t = _batch(2, (4, 8, 8))
    with pytest.raises(fastperc.InputError, match=r"teacher_kwargs: the teacher UNet2DConditionModel needs "
                                                  r"encoder_hidden_states, got nothing; pass the conditioning the "
                                                  r"student got \(encoder_hidden_states=...\)"):
        self_perceptual_loss(teacher, torch.randn_like(x0), x0, noise, t, NoiseSchedule.scaled_linear())
    assert not calls, "the teacher ran"


def test_a_wrong_batch_inside_teacher_kwargs_is_named():
    teacher = FrozenTeacher(cond_unet())
    x0, noise, t = _batch(2, (4, 8, 8))
    with pytest.raises(ValueError, match=r"teacher_kwargs\['encoder_hidden_states'\]: expected batch size 2 "
                                         r"\(as model_output\), got shape \(3, 5, 16\)"):
        self_perceptual_loss(teacher, torch.randn_like(x0), x0, noise, t, NoiseSchedule.scaled_linear(),
                             teacher_kwargs={"encoder_hidden_states": torch.randn(3, 5, 16)})
    with pytest.raises(ValueError, match=r"teacher_kwargs\['added_cond_kwargs'\]\['time_ids'\]: expected batch"):
        self_perceptual_loss(teacher, torch.randn_like(x0), x0, noise, t, NoiseSchedule.scaled_linear(),
                             teacher_kwargs={"encoder_hidden_states": torch.randn(2, 5, 16),
                                             "added_cond_kwargs": {"time_ids": torch.randn(4, 6)}})


def test_bf16_prediction_with_fp32_latents_under_autocast_is_the_drop_in():
    """What a diffusers script under accelerate's bf16 passes: the student's bf16 output, fp32 latents."""
    student, sched = cond_unet(), DDPMScheduler(prediction_type="v_prediction", rescale_betas_zero_snr=True,
                                                beta_schedule="scaled_linear")
    teacher = FrozenTeacher(student)
    x0, noise, t = _batch(2, (4, 8, 8))
    text = torch.randn(2, 5, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred = student(sched.add_noise(x0, noise, t), t, encoder_hidden_states=text).sample
        assert pred.dtype == torch.bfloat16
        loss = self_perceptual_loss(teacher, pred, x0, noise, t, sched, teacher_kwargs={"encoder_hidden_states": text})
    loss.backward()
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.parameters() if p.requires_grad
               and p.grad is not None)
    # Without autocast the same mixed dtypes give the fp32 loss of the upcast prediction.
    t2 = torch.randint(0, 1000, (2,))
    p16 = torch.randn_like(x0).bfloat16()
    a = self_perceptual_loss(teacher, p16, x0, noise, t, sched, timesteps_prime=t2,
                             teacher_kwargs={"encoder_hidden_states": text})
    b = self_perceptual_loss(teacher, p16.float(), x0, noise, t, sched, timesteps_prime=t2,
                             teacher_kwargs={"encoder_hidden_states": text})
    assert torch.equal(a, b)
