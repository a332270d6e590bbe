import pytest
import torch
import torch.nn.functional as F

import fastperc
from fastperc import FrozenTeacher, NoiseSchedule, SelfPerceptualLoss, self_perceptual_loss

from fastperc.ops import _backend

from .helpers import assert_close, hand_loss, tiny_unet

KINDS = ["epsilon", "v_prediction", "sample"]


def schedule_for(kind: str) -> NoiseSchedule:
    """The paper's zero-terminal-SNR table, except for epsilon, which that table cannot convert at its
    last step (refused when built): SD 1.5's table then."""
    return NoiseSchedule.scaled_linear(rescale_zero_terminal_snr=kind != "epsilon")


def _batch(b=4, dtype=torch.float64):
    x0 = torch.rand(b, 1, 8, 8, dtype=dtype) * 2 - 1
    return x0, torch.randn_like(x0), torch.randn_like(x0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layers, weights", [(("mid_block",), None), (("down_blocks.0", "mid_block"), [0.3, 1.7])])
def test_loss_equals_hand_computation(kind, layers, weights):
    model = tiny_unet(dtype=torch.float64).eval()
    schedule = schedule_for(kind)
    x0, noise, p = _batch()
    t, t2 = torch.randint(0, 1000, (4,)), torch.randint(0, 1000, (4,))
    got = self_perceptual_loss(FrozenTeacher(model, layers), p, x0, noise, t, schedule, prediction_type=kind,
                               layer_weights=weights, timesteps_prime=t2, backend="reference")
    want = hand_loss(model, layers, weights or [1.0] * len(layers), p, x0, noise, t, t2, schedule, kind)
    assert_close(got, want, rtol=1e-10, atol=1e-12, what=f"loss ({kind})")


def test_one_layer_loss_equals_mse_of_the_teacher_features():
    model = tiny_unet(dtype=torch.float64).eval()
    schedule = NoiseSchedule.scaled_linear()
    x0, noise, p = _batch()
    t, t2 = torch.randint(0, 1000, (4,)), torch.randint(0, 1000, (4,))
    teacher = FrozenTeacher(model)
    a, b, ap, sp = schedule.renoise_coefficients(t, t2, dtype=torch.float64)
    x_t = schedule.add_noise(x0, noise, t)
    col = lambda c: c.view(-1, 1, 1, 1)  # noqa: E731
    fake, real = col(a) * x_t + col(b) * p, col(ap) * x0 + col(sp) * noise
    want = F.mse_loss(teacher(fake, t2)[0], teacher(real, t2)[0])
    got = self_perceptual_loss(teacher, p, x0, noise, t, schedule, timesteps_prime=t2)
    assert_close(got, want, rtol=1e-10, atol=1e-12, what="loss")


@pytest.mark.parametrize("kind", KINDS)
def test_t_prime_equal_to_t_gives_zero_loss(kind):
    x0, noise, p = _batch()
    t = torch.randint(0, 1000, (4,))
    loss = self_perceptual_loss(tiny_unet(dtype=torch.float64).requires_grad_(False), p, x0, noise, t,
                                schedule_for(kind), prediction_type=kind, timesteps_prime=t, reduction="none")
    assert loss.shape == (4,) and torch.all(loss.abs() < 1e-20)


def test_prediction_types_agree_for_consistent_predictions():
    schedule = schedule_for("epsilon")  # one table all three can convert
    teacher = FrozenTeacher(tiny_unet(dtype=torch.float64))
    x0, noise, v = _batch()
    t, t2 = torch.randint(0, 999, (4,)), torch.randint(0, 1000, (4,))
    x0_hat, eps_hat = schedule.convert(schedule.add_noise(x0, noise, t), v, t, "v_prediction")
    losses = [self_perceptual_loss(teacher, pred, x0, noise, t, schedule, prediction_type=kind, timesteps_prime=t2,
                                   reduction="none") for pred, kind in
              [(v, "v_prediction"), (eps_hat, "epsilon"), (x0_hat, "sample")]]
    assert losses[0].abs().min() > 0
    assert_close(losses[1], losses[0], rtol=1e-8, atol=1e-14, what="epsilon vs v")
    assert_close(losses[2], losses[0], rtol=1e-8, atol=1e-14, what="sample vs v")


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_reference_path_passes_float64_gradcheck(backend):
    schedule = NoiseSchedule.scaled_linear()
    teacher = FrozenTeacher(tiny_unet(dtype=torch.float64), layers=("down_blocks.0", "mid_block"))
    x0, noise, p = _batch(2)
    p.requires_grad_(True)
    t, t2 = torch.randint(0, 1000, (2,)), torch.randint(0, 1000, (2,))

    def f(pred):
        return self_perceptual_loss(teacher, pred, x0, noise, t, schedule, timesteps_prime=t2,
                                    layer_weights=[0.5, 2.0], reduction="none", backend=backend)

    assert torch.autograd.gradcheck(f, (p,), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradient_reaches_the_student_and_never_the_teacher():
    schedule = NoiseSchedule.scaled_linear()
    student = tiny_unet()
    teacher = FrozenTeacher(student)
    x0, noise = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t = torch.randint(0, 1000, (4,))
    loss = self_perceptual_loss(teacher, student(schedule.add_noise(x0, noise, t), t), x0, noise, t, schedule)
    loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    grads = [p.grad for p in student.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.requires_grad for p in student.parameters())


def test_real_branch_records_no_graph():
    schedule = NoiseSchedule.scaled_linear()
    seen = []
    teacher = FrozenTeacher(tiny_unet())
    teacher.model.mid_block.register_forward_hook(lambda m, a, out: seen.append(out.requires_grad))
    p = torch.randn(2, 1, 8, 8, requires_grad=True)
    self_perceptual_loss(teacher, p, torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), schedule)
    assert seen == [False, True]  # real branch first, then the predicted branch


def test_fused_default_matches_reference_to_fp32_tolerance(device):
    # Without a fused backend "auto" would be the reference itself and this test would prove nothing.
    assert _backend.resolve("auto", torch.device(device)) != "reference", "no fused backend was built"
    schedule = NoiseSchedule.scaled_linear()
    student = tiny_unet(num_classes=5).to(device)
    teacher = FrozenTeacher(student, layers=("down_blocks.0", "mid_block"))
    x0, noise = torch.randn(6, 1, 8, 8, device=device), torch.randn(6, 1, 8, 8, device=device)
    t, t2 = torch.randint(0, 1000, (6,), device=device), torch.randint(0, 1000, (6,), device=device)
    labels = torch.randint(0, 5, (6,), device=device)
    out = {}
    for backend in ("reference", "auto"):
        student.zero_grad()
        v = student(schedule.add_noise(x0, noise, t), t, class_labels=labels)
        v.retain_grad()
        loss = self_perceptual_loss(teacher, v, x0, noise, t, schedule, timesteps_prime=t2, backend=backend,
                                    layer_weights=[0.5, 1.0], teacher_kwargs={"class_labels": labels})
        loss.backward()
        out[backend] = (loss.detach(), v.grad, [p.grad.clone() for p in student.parameters()])
    assert_close(out["auto"][0], out["reference"][0], rtol=1e-5, atol=1e-8, what="loss")
    ref_v = out["reference"][1]
    assert_close(out["auto"][1], ref_v, rtol=1e-5, atol=1e-6 * float(ref_v.abs().max()), what="grad of model_output")
    # Through the whole student fp32 rounding differs per path; compare all parameter gradients as one
    # vector (a parameter with a near-zero gradient alone is ill-conditioned for a relative check).
    g, r = torch.cat([x.flatten() for x in out["auto"][2]]), torch.cat([x.flatten() for x in out["reference"][2]])
    assert float((g - r).norm()) <= 1e-5 * float(r.norm()), "student parameter gradients"


def test_reductions_relate_as_mean_sum_none():
    schedule = NoiseSchedule.scaled_linear()
    teacher = FrozenTeacher(tiny_unet())
    x0, noise, p = _batch(5, torch.float32)
    t, t2 = torch.randint(0, 1000, (5,)), torch.randint(0, 1000, (5,))
    per = self_perceptual_loss(teacher, p, x0, noise, t, schedule, timesteps_prime=t2, reduction="none")
    total = self_perceptual_loss(teacher, p, x0, noise, t, schedule, timesteps_prime=t2, reduction="sum")
    mean = self_perceptual_loss(teacher, p, x0, noise, t, schedule, timesteps_prime=t2)
    assert per.shape == (5,) and per.dtype == torch.float32
    assert torch.allclose(per.sum(), total) and torch.allclose(per.mean(), mean)


def test_t_prime_is_drawn_from_the_generator():
    schedule = NoiseSchedule.scaled_linear()
    teacher = FrozenTeacher(tiny_unet())
    x0, noise, p = _batch(4, torch.float32)
    t = torch.randint(0, 1000, (4,))
    run = lambda seed: self_perceptual_loss(teacher, p, x0, noise, t, schedule,  # noqa: E731
                                            generator=torch.Generator().manual_seed(seed), reduction="none")
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


def test_plain_module_teacher_is_wrapped_with_midblock_default():
    schedule = NoiseSchedule.scaled_linear()
    model = tiny_unet().requires_grad_(False)
    x0, noise, p = _batch(3, torch.float32)
    t, t2 = torch.randint(0, 1000, (3,)), torch.randint(0, 1000, (3,))
    a = self_perceptual_loss(model, p, x0, noise, t, schedule, timesteps_prime=t2)
    b = self_perceptual_loss(FrozenTeacher(model, ("mid_block",)), p, x0, noise, t, schedule, timesteps_prime=t2)
    assert torch.equal(a, b)


def test_module_form_matches_function():
    model = tiny_unet()
    crit = SelfPerceptualLoss(model, layers=("down_blocks.1", "mid_block"), layer_weights=[1.0, 0.25])
    x0, noise, p = _batch(3, torch.float32)
    t, t2 = torch.randint(0, 1000, (3,)), torch.randint(0, 1000, (3,))
    want = self_perceptual_loss(crit.teacher, p, x0, noise, t, crit.schedule, timesteps_prime=t2,
                                layer_weights=[1.0, 0.25])
    assert torch.equal(crit(p, x0, noise, t, timesteps_prime=t2), want)
    assert all(q.requires_grad for q in model.parameters())
    assert not any(q.requires_grad for q in crit.parameters())


def test_public_api_is_exported():
    assert {"self_perceptual_loss", "SelfPerceptualLoss", "NoiseSchedule", "FrozenTeacher", "ops"} <= set(fastperc.__all__)


# ---- the module holds the whole recipe; the function is its thin form ---------------------------------
BEST = dict(layers=("conv_in", "down_blocks.0", "mid_block"), feature_norm="channel_rms", layer_weights=(1.0, 0.5, 2.0))


def _inputs(gen, b=4):
    x0, noise, p = torch.randn(3, b, 1, 8, 8, generator=gen).unbind(0)
    return p, x0, noise, torch.randint(0, 1000, (b,), generator=gen)


def test_the_module_holds_the_projects_best_recipe_and_equals_the_function(gen):
    schedule, model = NoiseSchedule.scaled_linear(), tiny_unet().requires_grad_(False)
    dist = fastperc.TimestepDistribution(0, 100)
    criterion = SelfPerceptualLoss(FrozenTeacher(model, BEST["layers"]), schedule, timesteps_prime=dist,
                                   feature_norm=BEST["feature_norm"], layer_weights=BEST["layer_weights"])
    p, x0, noise, t = _inputs(gen)
    got = criterion(p, x0, noise, t, generator=torch.Generator().manual_seed(5))
    want = self_perceptual_loss(model, p, x0, noise, t, schedule, timesteps_prime=dist,
                                generator=torch.Generator().manual_seed(5), **BEST)
    assert torch.equal(got, want)
    t2 = dist.sample(4, 1000, torch.Generator().manual_seed(5))
    assert torch.equal(got, criterion(p, x0, noise, t, timesteps_prime=t2))  # a call's t' overrides the module's
    assert not torch.equal(got, criterion(p, x0, noise, t, timesteps_prime=torch.full((4,), 900)))


def test_a_frozen_plain_module_is_wrapped_once_and_released_with_it(gen, monkeypatch):
    import gc
    import weakref

    built = []
    real_init = FrozenTeacher.__init__
    def counting_init(self, *a, **k):
        built.append(1)
        real_init(self, *a, **k)

    monkeypatch.setattr(FrozenTeacher, "__init__", counting_init)
    model = tiny_unet().requires_grad_(False)
    p, x0, noise, t = _inputs(gen)
    for _ in range(3):
        self_perceptual_loss(model, p, x0, noise, t, NoiseSchedule.scaled_linear())
    assert len(built) == 1
    model.train()  # its owner switched it back: the next call runs it in eval mode again
    self_perceptual_loss(model, p, x0, noise, t, NoiseSchedule.scaled_linear())
    assert not model.training and len(built) == 1
    gone = weakref.ref(model)
    del model
    gc.collect()
    assert gone() is None, "the cached wrapper kept its module alive"


def test_copies_and_pickles_of_a_module_carry_none_of_its_wrappers(gen):
    import copy
    import io

    model = tiny_unet().requires_grad_(False)
    p, x0, noise, t = _inputs(gen)
    self_perceptual_loss(model, p, x0, noise, t, NoiseSchedule.scaled_linear())
    assert not copy.deepcopy(model)._fastperc_frozen_teachers
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    assert not torch.load(buf, weights_only=False)._fastperc_frozen_teachers
    assert set(model.state_dict()) == set(tiny_unet().state_dict())


@pytest.mark.parametrize("weights", [[-0.5], [float("nan")], [float("inf")]])
def test_feature_mse_and_the_loss_refuse_the_same_weights(weights, gen):
    f = [torch.randn(2, 3, generator=gen, requires_grad=True)]
    with pytest.raises(ValueError, match=r"weights: expected finite values >= 0"):
        fastperc.ops.feature_mse(f, [torch.randn(2, 3, generator=gen)], weights)
    with pytest.raises(ValueError, match=r"layer_weights: expected finite values >= 0"):
        SelfPerceptualLoss(tiny_unet(), NoiseSchedule.scaled_linear(), layers=("mid_block",), layer_weights=weights)


def test_teacher_options_given_with_a_frozen_teacher_are_refused():
    with pytest.raises(ValueError, match="teacher_dtype/teacher_checkpoint/teacher_fp8: they build the teacher's copy"):
        SelfPerceptualLoss(FrozenTeacher(tiny_unet()), NoiseSchedule.scaled_linear(), teacher_dtype=torch.bfloat16)


# ---- the objective on a share of the batch -------------------------------------------------------------
@pytest.mark.parametrize("fraction, k", [(0.25, 2), (0.3, 3), (0.5, 4), (1.0, 8)])
def test_the_teacher_sees_the_first_k_samples_on_both_branches(fraction, k, gen):
    teacher = FrozenTeacher(tiny_unet(num_classes=3), ("conv_in", "mid_block"))
    seen = []
    teacher.model.conv_in.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[0]))
    p, x0, noise, t = _inputs(gen, 8 if fraction != 0.3 else 10)
    labels = torch.randint(0, 3, (p.shape[0],), generator=gen)
    self_perceptual_loss(teacher, p, x0, noise, t, NoiseSchedule.scaled_linear(), batch_fraction=fraction,
                         teacher_kwargs={"class_labels": labels})
    assert seen == [k, k]  # real and fake branch


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_a_share_of_the_batch_is_the_objective_on_k_samples_and_mse_on_the_rest(reduction, gen):
    schedule, teacher = NoiseSchedule.scaled_linear(), FrozenTeacher(tiny_unet(), ("down_blocks.0", "mid_block"))
    p, x0, noise, t = _inputs(gen, 8)
    p.requires_grad_(True)
    t2 = torch.randint(0, 1000, (8,), generator=gen)
    got = self_perceptual_loss(teacher, p, x0, noise, t, schedule, timesteps_prime=t2, batch_fraction=0.25,
                               reduction=reduction, layer_weights=[0.5, 2.0])
    (g,) = torch.autograd.grad(got.sum(), p)

    q = p.detach().clone().requires_grad_(True)
    sp = self_perceptual_loss(teacher, q[:2], x0[:2], noise[:2], t[:2], schedule, timesteps_prime=t2[:2],
                              reduction="none", layer_weights=[0.5, 2.0])
    mse = (q[2:] - schedule.target(x0[2:], noise[2:], t[2:])).square().flatten(1).mean(1)
    per_sample = torch.cat([sp, mse])
    want = {"mean": per_sample.mean(), "sum": per_sample.sum(), "none": per_sample}[reduction]
    (g_want,) = torch.autograd.grad(want.sum(), q)
    assert_close(got, want, rtol=1e-6, atol=1e-8, what="loss")
    assert_close(g, g_want, rtol=1e-5, atol=1e-9, what="gradient")


@pytest.mark.parametrize("fraction", [0.0, -0.5, 1.5, float("nan"), True])
def test_a_batch_fraction_outside_0_1_is_refused(fraction):
    with pytest.raises(ValueError, match=r"batch_fraction: expected a number in \(0, 1\]"):
        SelfPerceptualLoss(tiny_unet(), NoiseSchedule.scaled_linear(), batch_fraction=fraction)


def test_a_share_of_the_batch_slices_per_sample_conditioning_only():
    from fastperc.loss import _first_rows
    kw = {"encoder_hidden_states": torch.randn(8, 5, 16), "added_cond_kwargs": {"time_ids": torch.randn(8, 6)},
          "img_ids": torch.randn(8, 3), "guidance": torch.full((1,), 3.5), "joint_attention_kwargs": None}
    got = _first_rows(kw, 2, 8)
    assert got["encoder_hidden_states"].shape == (2, 5, 16) and got["added_cond_kwargs"]["time_ids"].shape == (2, 6)
    assert got["img_ids"] is kw["img_ids"]  # positions, not samples (even with 8 rows)
    assert got["guidance"] is kw["guidance"] and got["joint_attention_kwargs"] is None  # broadcast, options


def test_a_shallow_copy_of_a_module_gets_its_own_wrapper(gen):
    import copy

    from fastperc.loss import as_teacher
    model = tiny_unet().requires_grad_(False)
    first = as_teacher(model)
    twin = copy.copy(model)  # shares the original's __dict__ entries, the cache among them
    assert as_teacher(twin).model is twin and as_teacher(model) is first
