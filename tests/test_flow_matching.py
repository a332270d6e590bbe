"""Flow matching (rectified flow as diffusers trains SD3 and Flux): the table, the conversions, the loss
against a naive implementation, float timesteps, the t' draws, and the refusals."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from diffusers import (DDPMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler,
                       FlowMatchHeunDiscreteScheduler)
from diffusers.training_utils import compute_density_for_timestep_sampling

import fastperc
from fastperc import FlowMatchingSchedule, FrozenTeacher, NoiseSchedule, SelfPerceptualLoss, TimestepDistribution
from fastperc import self_perceptual_loss
from fastperc._per_sample import accumulation_dtype
from fastperc.ops import _backend

from .helpers import HostSyncAlarm, assert_close, tiny_unet

T = 1000
FUSED = [b for b in ("cpu", "triton") if _backend.why_unavailable(b, "cpu") is None]


def _images(gen, b=4, shape=(1, 8, 8), dtype=torch.float64):
    x0 = torch.rand(b, *shape, generator=gen, dtype=dtype) * 2 - 1
    noise = torch.randn(b, *shape, generator=gen, dtype=dtype)
    return x0, noise


def _table_timesteps(schedule, gen, b=4):
    """Float timesteps as diffusers' training scripts take them: scheduler.timesteps[indices]."""
    return schedule.timesteps[torch.randint(0, schedule.num_train_timesteps, (b,), generator=gen)]


def _col(c):
    return c.reshape(-1, 1, 1, 1)


# ---- the table -----------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_table_equals_diffusers_flow_match_euler_table(shift):
    theirs = FlowMatchEulerDiscreteScheduler(shift=shift)
    ours = NoiseSchedule.flow_matching(shift=shift)
    assert isinstance(ours, FlowMatchingSchedule) and ours.num_train_timesteps == T
    assert torch.equal(ours.timesteps, theirs.timesteps)  # the float timesteps users pass, bit for bit
    assert_close(ours.sigmas, theirs.sigmas, rtol=0, atol=1e-7, what="sigmas vs diffusers' float32")
    u = torch.arange(T, 0, -1, dtype=torch.float64) / T  # the formula in float64
    assert_close(ours.sigmas, shift * u / (1 + (shift - 1) * u), rtol=0, atol=2e-7, what="sigmas vs float64 truth")
    assert float(ours.sigmas[0]) == 1.0 and (ours.sigmas[1:] < ours.sigmas[:-1]).all()


def test_from_diffusers_reads_the_training_table_even_after_set_timesteps():
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    train_timesteps = sched.timesteps.clone()
    sched.set_timesteps(20)  # a pipeline ran with it: sigmas/timesteps are now the 20-step inference table
    assert sched.timesteps.shape == (20,)
    ours = NoiseSchedule.from_diffusers(sched)
    assert isinstance(ours, FlowMatchingSchedule) and ours.shift == 3.0 and ours.prediction_type == "flow_prediction"
    assert torch.equal(ours.timesteps, train_timesteps)
    # use_dynamic_shifting (Flux): diffusers' training table is the unshifted one.
    dyn = NoiseSchedule.from_diffusers(FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True))
    assert torch.equal(dyn.timesteps, FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True).timesteps)
    assert torch.equal(dyn.timesteps, NoiseSchedule.flow_matching().timesteps)
    heun = NoiseSchedule.from_diffusers(FlowMatchHeunDiscreteScheduler(shift=3.0))  # same training table
    assert torch.equal(heun.timesteps, train_timesteps)
    with pytest.raises(ValueError, match="scheduler: a DPMSolverMultistepScheduler with use_flow_sigmas=True"):
        NoiseSchedule.from_diffusers(DPMSolverMultistepScheduler(prediction_type="flow_prediction",
                                                                 use_flow_sigmas=True))


def test_add_noise_equals_scale_noise_and_target_is_noise_minus_x0(gen):
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    ours = NoiseSchedule.from_diffusers(sched)
    x0, noise = _images(gen, 6, (3, 8, 8), torch.float32)
    t = _table_timesteps(sched, gen, 6)
    assert_close(ours.add_noise(x0, noise, t), sched.scale_noise(x0, t, noise), rtol=0, atol=1e-6, what="x_t")
    assert torch.equal(ours.target(x0, noise, t), noise - x0)
    a, s = ours.alpha_sigma(t, torch.float64)
    assert torch.equal(s, t.double() / T) and torch.equal(a, 1 - t.double() / T)


# ---- conversions ---------------------------------------------------------------------------------
def test_convert_recovers_x0_and_noise_from_the_true_velocity(gen):
    s = NoiseSchedule.flow_matching(shift=3.0)
    x0, noise = _images(gen, 8)
    t = _table_timesteps(s, gen, 8)
    t[0], t[1] = float(T), 0.0  # pure noise and clean: no division, both convert
    x_t = s.add_noise(x0, noise, t)
    x0_hat, eps_hat = s.convert(x_t, s.target(x0, noise, t), t)
    assert_close(x0_hat, x0, rtol=0, atol=1e-12, what="x0_hat")
    assert_close(eps_hat, noise, rtol=0, atol=1e-12, what="eps_hat")


def test_convert_agrees_with_dpmsolver_flow_prediction(gen):
    """DPMSolverMultistepScheduler(dpmsolver++, flow_prediction, use_flow_sigmas) converts a flow
    prediction to x0 at its step index: x0 = x_t - sigma v. Its integer timesteps are rounded, so
    ours get the exact float timestep sigma * T of that step."""
    dpm = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                      algorithm_type="dpmsolver++")
    dpm.set_timesteps(20)
    ours = NoiseSchedule.flow_matching(shift=3.0)
    x_t, v = _images(gen, 2)
    for k in torch.randint(0, 20, (3,), generator=gen).tolist():
        dpm.set_begin_index(k)
        dpm._init_step_index(dpm.timesteps[k])
        theirs = dpm.convert_model_output(v, sample=x_t)
        t = (dpm.sigmas[k].double() * T).expand(2)
        x0_hat, _ = ours.convert(x_t, v, t)
        assert_close(x0_hat, theirs, rtol=0, atol=1e-12, what=f"x0 at DPM step {k}")


def test_renoise_coefficients_are_one_ds_one_minus_s_prime_s_prime(gen):
    s = NoiseSchedule.flow_matching(shift=3.0)
    t, t2 = _table_timesteps(s, gen, 16), _table_timesteps(s, gen, 16)
    a, b, ap, sp = s.renoise_coefficients(t, t2, dtype=torch.float64)
    sig, sig2 = t.double() / T, t2.double() / T
    assert torch.equal(a, torch.ones(16, dtype=torch.float64)) and torch.equal(b, sig2 - sig)
    assert torch.equal(ap, 1 - sig2) and torch.equal(sp, sig2)
    # = the general form alpha' * (c_x0, d_x0) + sigma' * (c_eps, d_eps) from convert_coefficients
    c_x0, d_x0, c_eps, d_eps = s.convert_coefficients(t, dtype=torch.float64)
    assert_close(ap * c_x0 + sp * c_eps, a, rtol=0, atol=1e-15, what="a")
    assert_close(ap * d_x0 + sp * d_eps, b, rtol=0, atol=1e-15, what="b")


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_t_prime_equal_t_gives_the_fake_x_t_exactly(gen, backend, dtype):
    s = NoiseSchedule.flow_matching(shift=3.0)
    x0, noise = _images(gen, 4, dtype=dtype)
    v = torch.randn(x0.shape, generator=gen, dtype=dtype)
    t = _table_timesteps(s, gen, 4)
    x_t = s.add_noise(x0, noise, t)
    coefs = s.renoise_coefficients(t, t, dtype=accumulation_dtype(dtype))
    fake, real = fastperc.ops.renoise(x_t, v, x0, noise, *coefs, backend=backend)
    assert torch.equal(fake, x_t)
    assert_close(real, x_t, rtol=0, atol=1e-6 if dtype == torch.float32 else 1e-14, what="real")


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_the_fake_is_one_euler_step_of_flow_match_euler(gen, backend):
    """fake = x_t + (s' - s) v is FlowMatchEulerDiscreteScheduler.step from s to s': between neighbours
    of the training table, and from the last step of a 20-step inference table to sigma = 0."""
    x0, noise = _images(gen, 1, (3, 8, 8), torch.float32)
    v = torch.randn(x0.shape, generator=gen)
    ours = NoiseSchedule.flow_matching(shift=3.0)
    cases = []
    for k in torch.randint(0, T - 1, (3,), generator=gen).tolist():
        sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
        cases.append((sched, k, sched.timesteps[k], sched.timesteps[k + 1]))
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(20)
    cases.append((sched, 19, sched.timesteps[19], torch.tensor(0.0)))
    for sched, k, t, t2 in cases:
        t, t2 = t.reshape(1), t2.reshape(1)
        x_t = ours.add_noise(x0, noise, t)
        sched.set_begin_index(k)
        want = sched.step(v, t, x_t).prev_sample
        fake, _ = fastperc.ops.renoise(x_t, v, x0, noise, *ours.renoise_coefficients(t, t2), backend=backend)
        assert_close(fake, want, rtol=1e-5, atol=1e-6, what=f"Euler step from index {k}")


# ---- the loss ------------------------------------------------------------------------------------
def naive_flow_loss(model, v, x0, noise, t, t2, layer="mid_block"):
    """The objective by hand: re-noise, full forwards of the untruncated teacher with a hook, MSE."""
    s, s2 = _col(t.to(x0.dtype) / T), _col(t2.to(x0.dtype) / T)
    x_t = (1 - s) * x0 + s * noise
    x0_hat, eps_hat = x_t - s * v, x_t + (1 - s) * v
    real = (1 - s2) * x0 + s2 * noise
    fake = (1 - s2) * x0_hat + s2 * eps_hat
    feats = []
    handle = dict(model.named_modules())[layer].register_forward_hook(lambda m, a, out: feats.append(out))
    try:
        with torch.no_grad():
            model(real, t2)
        model(fake, t2)
    finally:
        handle.remove()
    return F.mse_loss(feats[1], feats[0])


@pytest.mark.parametrize("backend", ["reference"] + FUSED)
def test_loss_and_gradient_equal_a_naive_implementation(gen, backend):
    model = tiny_unet(dtype=torch.float64).eval().requires_grad_(False)
    schedule = NoiseSchedule.flow_matching(shift=3.0)
    x0, noise = _images(gen)
    t, t2 = _table_timesteps(schedule, gen), _table_timesteps(schedule, gen)
    v = torch.randn(x0.shape, generator=gen, dtype=torch.float64, requires_grad=True)
    got = self_perceptual_loss(FrozenTeacher(model), v, x0, noise, t, schedule, timesteps_prime=t2, backend=backend)
    (grad,) = torch.autograd.grad(got, v)
    v2 = v.detach().clone().requires_grad_(True)
    want = naive_flow_loss(model, v2, x0, noise, t, t2)
    want.backward()
    assert float(want.detach()) > 0
    assert_close(got, want, rtol=1e-10, atol=1e-14, what=f"loss ({backend})")
    assert_close(grad, v2.grad, rtol=1e-8, atol=1e-14, what=f"d loss / d v ({backend})")


def test_the_scheduler_and_its_float_timesteps_work_end_to_end(gen):
    """A diffusers training step as the SD3 script writes it, with the loss swapped in."""
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0)
    student = tiny_unet()
    teacher = FrozenTeacher(tiny_unet())
    x0, noise = _images(gen, 4, dtype=torch.float32)
    u = compute_density_for_timestep_sampling("logit_normal", 4, logit_mean=0.0, logit_std=1.0, generator=gen)
    timesteps = sched.timesteps[(u * T).long()]
    sigmas = sched.sigmas[(u * T).long()].reshape(-1, 1, 1, 1)
    noisy = (1.0 - sigmas) * x0 + sigmas * noise
    pred = student(noisy, timesteps)
    t2 = _table_timesteps(sched, gen)
    a = self_perceptual_loss(teacher, pred, x0, noise, timesteps, sched, timesteps_prime=t2)
    b = self_perceptual_loss(teacher, pred, x0, noise, timesteps, NoiseSchedule.from_diffusers(sched),
                             timesteps_prime=t2)
    assert torch.equal(a, b) and torch.isfinite(a) and float(a.detach()) > 0
    crit = SelfPerceptualLoss(teacher, sched)
    loss = crit(pred, x0, noise, timesteps, generator=gen)  # t' drawn from the flow table
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in student.parameters() if p.requires_grad)
    # t' = t: the fake is x_t, the real the same point of the flow: a perfect prediction scores 0.
    perfect = self_perceptual_loss(teacher, noise - x0, x0, noise, timesteps, sched, timesteps_prime=timesteps)
    assert float(perfect.detach()) < 1e-10


def test_integer_timesteps_still_work_for_ddpm_schedules(gen):
    sched = DDPMScheduler(beta_schedule="scaled_linear", rescale_betas_zero_snr=True, prediction_type="v_prediction")
    x0, noise = _images(gen, 3, dtype=torch.float32)
    t = torch.randint(0, T, (3,), generator=gen)
    loss = self_perceptual_loss(FrozenTeacher(tiny_unet()), torch.randn(x0.shape, generator=gen), x0, noise, t, sched,
                                generator=gen)
    assert torch.isfinite(loss)
    t2 = TimestepDistribution().sample(3, schedule=NoiseSchedule.from_diffusers(sched), generator=gen)
    assert t2.dtype == torch.long


@pytest.mark.parametrize("t_prime", ["drawn", "given"])
def test_flow_loss_and_backward_make_no_host_sync(gen, t_prime):
    schedule = NoiseSchedule.flow_matching(shift=3.0)
    teacher = FrozenTeacher(tiny_unet())
    x0, noise = _images(gen, 4, dtype=torch.float32)
    t, t2 = _table_timesteps(schedule, gen), _table_timesteps(schedule, gen)
    v = torch.randn(x0.shape, generator=gen, requires_grad=True)
    kw = {"timesteps_prime": t2} if t_prime == "given" else {"generator": gen}
    with HostSyncAlarm() as alarm:
        self_perceptual_loss(teacher, v, x0, noise, t, schedule, **kw).backward()
    assert alarm.hits == [], alarm.hits


@pytest.mark.parametrize("t_prime", ["drawn", "given"])
def test_a_flow_step_traces_as_one_graph_without_breaks(gen, t_prime):
    """The float-timestep path (range check, sigma = t / T, the t' draw from the table) adds no graph break."""
    torch._dynamo.reset()
    student = tiny_unet(num_classes=3)
    teacher = FrozenTeacher(student, layers=("down_blocks.0", "mid_block"))
    schedule = NoiseSchedule.flow_matching(shift=3.0)
    x0, noise = _images(gen, 4, dtype=torch.float32)
    labels = torch.randint(0, 3, (4,), generator=gen)
    t, t2 = _table_timesteps(schedule, gen), _table_timesteps(schedule, gen)
    kw = {"timesteps_prime": t2} if t_prime == "given" else {}

    def step(x0, noise, t, labels):
        v = student(schedule.add_noise(x0, noise, t), t, class_labels=labels)
        return self_perceptual_loss(teacher, v, x0, noise, t, schedule, teacher_kwargs={"class_labels": labels}, **kw)

    explanation = torch._dynamo.explain(step)(x0, noise, t, labels)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1, explanation.break_reasons


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_flow_loss_on_a_gpu_agrees_across_backends_and_runs_under_sync_debug_mode():
    schedule = NoiseSchedule.flow_matching(shift=3.0)
    teacher = FrozenTeacher(tiny_unet().cuda())
    x0, noise, v = torch.randn(3, 4, 1, 8, 8, device="cuda").unbind(0)[:3]
    t = schedule.timesteps[torch.randint(0, T, (4,))].cuda()
    t2 = schedule.timesteps[torch.randint(0, T, (4,))].cuda()
    backends = ["reference"] + [b for b in ("cuda", "triton") if _backend.why_unavailable(b, "cuda") is None]
    want = self_perceptual_loss(teacher, v, x0, noise, t, schedule, timesteps_prime=t2, backend="reference")
    for backend in backends:
        got = self_perceptual_loss(teacher, v, x0, noise, t, schedule, timesteps_prime=t2, backend=backend)
        assert_close(got, want, rtol=1e-5, atol=1e-7, what=backend)
    self_perceptual_loss(teacher, v, x0, noise, t, schedule)  # warm-up: per-device tables
    v.requires_grad_(True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        self_perceptual_loss(teacher, v, x0, noise, t, schedule).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


# ---- the t' draws --------------------------------------------------------------------------------
@pytest.mark.parametrize("density", ["uniform", "logit_normal", "mode"])
def test_t_prime_draws_for_flow_schedules_lie_on_the_table(gen, density):
    s = NoiseSchedule.flow_matching(shift=3.0)
    t2 = TimestepDistribution(density=density).sample(4096, schedule=s, generator=gen)
    assert t2.dtype == torch.float32 and t2.shape == (4096,)
    assert torch.isin(t2, FlowMatchEulerDiscreteScheduler(shift=3.0).timesteps).all()
    assert t2.unique().numel() > 200  # spread over the table
    # A range of ranks (0 = least noisy entry) keeps the draws inside those entries.
    low = TimestepDistribution(low=0, high=499, density=density).sample(4096, schedule=s, generator=gen)
    assert torch.isin(low, s.timesteps[500:]).all()


@pytest.mark.parametrize("density", ["mode", "logit_normal"])
def test_densities_are_diffusers_with_u_read_as_the_noise_level(density):
    """diffusers' scripts index the noisiest-first table with u; ours reads u as the noise level (the
    SD3 paper's t): the same u gives the mirrored entry, hence for loc = 0 the same distribution."""
    s = NoiseSchedule.flow_matching(shift=3.0)
    n = 2048
    ours = TimestepDistribution(density=density).sample(n, schedule=s, generator=torch.Generator().manual_seed(5))
    u = compute_density_for_timestep_sampling(density, n, logit_mean=0.0, logit_std=1.0, mode_scale=1.29,
                                              generator=torch.Generator().manual_seed(5))
    mirrored = s.timesteps[T - 1 - (u * T).long().clamp(0, T - 1)]
    if density == "mode":  # the same uniform draws: entry for entry
        assert torch.equal(ours, mirrored)
    else:  # the same normal draws, up to rounding at a bin edge
        assert (ours == mirrored).float().mean() > 0.99
    # loc > 0 moves the draws toward noise, as for DDPM tables.
    g = torch.Generator().manual_seed(6)
    hi = TimestepDistribution(density="logit_normal", loc=1.5).sample(n, schedule=s, generator=g).mean()
    lo = TimestepDistribution(density="logit_normal", loc=-1.5).sample(n, schedule=s, generator=g).mean()
    assert float(lo) < float(hi)


# ---- refusals ------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_vp_prediction_types_on_a_flow_table_are_refused_when_built(kind):
    match = f"prediction_type: a flow-matching schedule .* takes 'flow_prediction'.* got '{kind}'"
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.flow_matching(prediction_type=kind)
    flow = NoiseSchedule.flow_matching()
    with pytest.raises(ValueError, match=match):
        SelfPerceptualLoss(tiny_unet(), flow, prediction_type=kind)
    x0, t = torch.randn(2, 1, 8, 8), flow.timesteps[:2]
    with pytest.raises(ValueError, match=match):
        self_perceptual_loss(tiny_unet().requires_grad_(False), x0, x0, torch.randn_like(x0), t, flow,
                             prediction_type=kind)
    with pytest.raises(ValueError, match=match):
        flow.renoise_coefficients(t, t, kind)


def test_flow_prediction_on_a_vp_table_is_refused():
    match = "prediction_type: 'flow_prediction' needs a flow-matching schedule"
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.scaled_linear(prediction_type="flow_prediction")
    with pytest.raises(ValueError, match=match):
        SelfPerceptualLoss(tiny_unet(), NoiseSchedule.scaled_linear(), prediction_type="flow_prediction")
    with pytest.raises(ValueError, match=match):
        NoiseSchedule.cosine().target(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([1, 2]), "flow_prediction")


@pytest.mark.parametrize("kw, exc, match", [
    ({"timesteps": torch.tensor([3, 500])}, TypeError, "timesteps: expected float timesteps sigma \\* 1000"),
    ({"timesteps": torch.tensor([3.0, 500.0, 7.0])}, ValueError, r"timesteps: expected shape \(2,\)"),
    ({"timesteps": torch.tensor([[3.0, 500.0]])}, ValueError, r"timesteps: expected shape \(2,\)"),
    ({"timesteps": [3.0, 500.0]}, TypeError, "timesteps: expected a floating torch.Tensor"),
    ({"timesteps": torch.tensor([3.0, 1000.5]), "check_values": True}, ValueError,
     r"timesteps: expected values in \[0, 1000\] \(sigma \* 1000\), got min 3, max 1000.5"),
    ({"timesteps": torch.tensor([-0.5, 10.0]), "check_values": True}, ValueError, r"timesteps: expected values"),
    ({"timesteps": torch.tensor([math.nan, 10.0]), "check_values": True}, ValueError, r"timesteps: expected values"),
    # Without check_values the range is a device-side assert (no host sync), with the same message.
    ({"timesteps": torch.tensor([3.0, 1000.5])}, RuntimeError, r"timesteps: expected values in \[0, 1000\]"),
    ({"timesteps_prime": torch.tensor([-5.0, 10.0])}, RuntimeError, r"timesteps_prime: expected values in \[0, 1000\]"),
    ({"timesteps_prime": torch.tensor([5, 10])}, TypeError, "timesteps_prime: expected float timesteps"),
    ({"timesteps_prime": torch.tensor([5.0])}, ValueError, r"timesteps_prime: expected shape \(2,\)"),
])
def test_bad_flow_timesteps_name_the_argument(kw, exc, match):
    flow = NoiseSchedule.flow_matching()
    x0 = torch.randn(2, 1, 8, 8)
    args = {"timesteps": flow.timesteps[:2], "timesteps_prime": flow.timesteps[2:4], **kw}
    check_values = args.pop("check_values", False)
    with pytest.raises(exc, match=match):
        self_perceptual_loss(tiny_unet().requires_grad_(False), torch.randn_like(x0), x0, torch.randn_like(x0),
                             args["timesteps"], flow, timesteps_prime=args["timesteps_prime"],
                             check_values=check_values)


def test_bad_flow_arguments_are_refused():
    with pytest.raises(ValueError, match=r"timesteps: expected values in \[0, 1000\]"):
        NoiseSchedule.flow_matching().add_noise(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([1.0, 1001.0]))
    for shift in (0.0, -1.0, math.inf):
        with pytest.raises(ValueError, match="shift: expected a finite number > 0"):
            NoiseSchedule.flow_matching(shift=shift)
    with pytest.raises(ValueError, match="mode_scale: expected a number in"):
        TimestepDistribution(density="mode", mode_scale=2.0)
    assert not hasattr(NoiseSchedule.flow_matching(), "alphas_cumprod")  # a sibling, not a VP table


# ---- serialisation -------------------------------------------------------------------------------
def test_a_flow_schedule_is_stored_in_the_model_config_and_rebuilt():
    from fastperc.recipes.models import schedule_config, schedule_of
    stored = json.loads(json.dumps({"schedule": schedule_config("flow_prediction", shift=3.0)}))
    rebuilt = schedule_of(stored)
    assert isinstance(rebuilt, FlowMatchingSchedule) and rebuilt.shift == 3.0
    assert torch.equal(rebuilt.timesteps, FlowMatchEulerDiscreteScheduler(shift=3.0).timesteps)
    old = schedule_of({"prediction_type": "v_prediction", "zero_terminal_snr": True})  # a checkpoint from before
    assert torch.equal(old.alphas_cumprod, NoiseSchedule.scaled_linear().alphas_cumprod)
