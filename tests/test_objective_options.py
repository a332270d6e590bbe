"""The study's options of the objective: the t' distribution, per-channel feature normalisation, the
objective on a band of t (MSE elsewhere), and the fine-tune's optimizer."""
from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from fastperc import FrozenTeacher, NoiseSchedule, TimestepDistribution, self_perceptual_loss
from fastperc.recipes import checkpoint
from fastperc.loss import normalize_features
from fastperc.recipes.train import TimestepStrata, TrainConfig, _objective, train

from .helpers import tiny_unet


def test_uniform_range_stays_inside_and_covers_it():
    t = TimestepDistribution(low=100, high=199).sample(20000, 1000, torch.Generator().manual_seed(0))
    assert int(t.min()) == 100 and int(t.max()) == 199 and t.dtype == torch.long
    assert abs(float(t.float().mean()) - 149.5) < 2


def test_logit_normal_location_moves_the_draws():
    g = torch.Generator().manual_seed(0)
    low = TimestepDistribution(density="logit_normal", loc=-1.5).sample(20000, 1000, g).float().mean()
    mid = TimestepDistribution(density="logit_normal", loc=0.0).sample(20000, 1000, g).float().mean()
    assert float(low) < 300 < float(mid) < 560 and float(mid) > 440


def test_default_distribution_draws_what_the_loop_drew_before():
    """Uniform over the table with one generator: the same numbers as torch.randint(0, T)."""
    a = TimestepDistribution().sample(64, 1000, torch.Generator().manual_seed(3))
    b = torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


@pytest.mark.parametrize("kw, message", [({"low": -1}, "low: expected"), ({"low": 5, "high": 2}, "high: expected"),
                                         ({"density": "beta"}, "density: expected"), ({"scale": 0.0}, "loc/scale")])
def test_bad_distributions_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        TimestepDistribution(**kw)


def test_a_range_past_the_table_is_refused_when_drawn():
    with pytest.raises(ValueError, match="high: expected a timestep below num_train_timesteps = 1000"):
        TimestepDistribution(high=1000).sample(2, 1000)


def _case(gen):
    schedule = NoiseSchedule.scaled_linear()
    teacher = FrozenTeacher(tiny_unet(), ("conv_in", "mid_block"))
    x0, noise, p = torch.randn(3, 4, 1, 8, 8, generator=gen).unbind(0)[:3]
    return schedule, teacher, x0, noise, p


def test_loss_with_a_distribution_equals_the_loss_with_its_draw(gen):
    schedule, teacher, x0, noise, p = _case(gen)
    t = torch.tensor([5, 500, 900, 20])
    dist = TimestepDistribution(low=0, high=250)
    a = self_perceptual_loss(teacher, p, x0, noise, t, schedule, timesteps_prime=dist,
                             generator=torch.Generator().manual_seed(7))
    t2 = dist.sample(4, 1000, torch.Generator().manual_seed(7))
    b = self_perceptual_loss(teacher, p, x0, noise, t, schedule, timesteps_prime=t2)
    assert torch.equal(a, b)


def test_channel_rms_normalisation_is_the_hand_computed_loss_and_scale_free(gen):
    real = [torch.randn(2, 3, 4, 4, generator=gen) * 50, torch.randn(2, 5, generator=gen)]
    fake = [r + 0.1 * torch.randn(r.shape, generator=gen) * r.abs().mean() for r in real]
    nr, nf = normalize_features(real, fake, "channel_rms")
    rms = real[0].square().mean((2, 3), keepdim=True).add(1e-6).sqrt()
    assert torch.allclose(nf[0], fake[0] / rms, rtol=1e-5) and torch.allclose(nr[0], real[0] / rms, rtol=1e-5)
    assert torch.allclose(nr[1], real[1] / (real[1].square().mean(1, keepdim=True) + 1e-6).sqrt(), rtol=1e-5)  # (B, N)
    nr2, nf2 = normalize_features([r * 1000 for r in real], [f * 1000 for f in fake], "channel_rms")
    for a, b in zip(nf + nr, nf2 + nr2):  # a tap's scale no longer matters
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)
    assert normalize_features(real, fake, "none") == (real, fake)


def test_bad_feature_norm_is_refused(gen):
    schedule, teacher, x0, noise, p = _case(gen)
    with pytest.raises(ValueError, match="feature_norm: expected one of"):
        self_perceptual_loss(teacher, p, x0, noise, torch.tensor([1, 2, 3, 4]), schedule, feature_norm="lpips")


@pytest.mark.parametrize("band, k", [((0, 999), 4), ((1000, 2000), 0), ((0, 499), 2)])
def test_objective_on_a_band_of_t_runs_the_teacher_on_the_first_k_and_mse_on_the_rest(band, k, gen):
    schedule = NoiseSchedule.scaled_linear()
    teacher = FrozenTeacher(tiny_unet())
    x0, noise = torch.randn(2, 4, 1, 8, 8, generator=gen).unbind(0)
    t, t2 = torch.tensor([100, 300, 800, 900]), torch.tensor([50, 60, 70, 80])
    pred = torch.randn(4, 1, 8, 8, generator=gen)
    cfg = TrainConfig(out="", objective="self_perceptual", init="x", objective_t_range=band)
    assert TimestepStrata.of(cfg, schedule, 4, torch.device("cpu")).k == k  # the band's share of 4 samples
    got = _objective(cfg, teacher, schedule, pred, x0, noise, t, t2, None, k)
    sp = self_perceptual_loss(teacher, pred, x0, noise, t, schedule, timesteps_prime=t2, reduction="none")
    mse = (pred - schedule.target(x0, noise, t)).square().flatten(1).mean(1)
    assert torch.allclose(got, torch.cat([sp[:k], mse[k:]]).mean(), rtol=1e-6)


@pytest.mark.parametrize("band", [(0, 99), (0, 499), (250, 499), (0, 1000), (1001, 2000)])
@pytest.mark.parametrize("flow", [False, True])
def test_a_band_of_t_is_drawn_stratified_with_the_same_k_in_every_micro_batch(band, flow):
    schedule = NoiseSchedule.flow_matching() if flow else NoiseSchedule.scaled_linear()
    cfg = TrainConfig(out="", objective="self_perceptual", init="x", objective_t_range=band, schedule="ddpm")
    strata = TimestepStrata.of(cfg, schedule, 8, torch.device("cpu"))
    values = schedule.timesteps if flow else torch.arange(1000)
    share = float(((values >= band[0]) & (values <= band[1])).float().mean())
    assert strata.k == round(8 * share)
    t = strata.draw(64, torch.Generator().manual_seed(0)).view(8, 8)  # 8 micro-batches of 8
    inside = (t >= band[0]) & (t <= band[1])
    assert inside[:, :strata.k].all() and not inside[:, strata.k:].any()
    assert t.dtype == values.dtype and bool(torch.isin(t, values).all())


TINY = dict(block_channels=(8, 16), batch_size=8, warmup_steps=1, log_every=1, progress=False)


@pytest.fixture(scope="module")
def mse_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("mse")
    train(TrainConfig(out=str(out), conditional=True, max_steps=2, save_every=2, lr=1e-3, **TINY))
    return out


def test_sgd_fine_tune_with_every_option_trains_and_skips_bad_steps(mse_model, tmp_path, monkeypatch):
    cfg = TrainConfig(out=str(tmp_path / "a"), objective="self_perceptual", init=str(mse_model), conditional=True,
                      layers=("conv_in", "mid_block"), feature_norm="channel_rms", t_prime_range=(0, 400),
                      t_prime_density="logit_normal", t_prime_loc=-0.5, objective_t_range=(0, 600),
                      optimizer="sgd", momentum=0.9, lr=1e-3, max_steps=3, save_every=3, **TINY)
    train(cfg)
    first = checkpoint.load(tmp_path / "a")
    assert "momentum_buffer" in next(iter(first["optimizer"]["state"].values()))
    # The same run whose last two steps are NaN ends where the 3-step run ended: SGD skips them too.
    import fastperc.recipes.train as train_mod
    real, calls = train_mod._objective, {"n": 0}

    def poisoned(*a, **k):
        calls["n"] += 1
        return real(*a, **k) * (float("nan") if calls["n"] > 3 else 1.0)

    monkeypatch.setattr(train_mod, "_objective", poisoned)
    train(replace(cfg, out=str(tmp_path / "b"), max_steps=5, save_every=5))
    second = checkpoint.load(tmp_path / "b")
    for k in first["model"]:
        assert torch.equal(first["model"][k], second["model"][k]), k
    log = [json.loads(ln) for ln in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert log[-1]["bad_steps"] == 2


def test_adam_eps_reaches_the_optimizer(mse_model, tmp_path):
    train(TrainConfig(out=str(tmp_path / "e"), init=str(mse_model), conditional=True, adam_eps=1e-3, max_steps=1,
                      save_every=1, **TINY))
    assert checkpoint.load(tmp_path / "e")["optimizer"]["param_groups"][0]["eps"] == 1e-3


def test_reference_mse_target_is_what_the_plain_objective_uses(gen):
    schedule = NoiseSchedule.scaled_linear()
    x0, noise, pred = torch.randn(3, 2, 1, 8, 8, generator=gen).unbind(0)
    t = torch.tensor([3, 700])
    cfg = TrainConfig(out="")
    assert torch.equal(_objective(cfg, None, schedule, pred, x0, noise, t, t, None, 0),
                       F.mse_loss(pred, schedule.velocity(x0, noise, t)))


@pytest.mark.parametrize("band, micro", [((0, 100), 4), ((0, 899), 4)])
def test_a_band_that_rounds_to_none_or_all_of_a_micro_batch_is_refused(band, micro):
    cfg = TrainConfig(out="", objective="self_perceptual", init="x", objective_t_range=band)
    with pytest.raises(ValueError, match=r"objective_t_range: the band .* would never be drawn"):
        TimestepStrata.of(cfg, NoiseSchedule.scaled_linear(), micro, torch.device("cpu"))


def test_the_learning_rate_warms_up_then_stays_or_decays_on_a_cosine_to_zero_at_the_last_step():
    from fastperc.recipes.objective import lr_factor
    cfg = TrainConfig(out="x", max_steps=110, warmup_steps=10)
    good = torch.arange(110)
    constant = lr_factor(cfg, good, 10)
    assert torch.allclose(constant[:10], (good[:10] + 1).double() / 10, atol=0, rtol=1e-12) and (constant[10:] == 1).all()
    cosine = lr_factor(replace(cfg, lr_schedule="cosine"), good, 10)
    assert torch.equal(cosine[:10], constant[:10]) and cosine[9] == 1.0
    assert abs(float(cosine[59]) - 0.5) < 1e-12 and float(cosine[-1]) == 0.0  # half-way: 0.5; the last step: 0
    assert (cosine[10:].diff() < 0).all()
    with pytest.raises(ValueError, match="lr_schedule: expected one of"):
        replace(cfg, lr_schedule="linear").validate()
