"""The application with a transformer on flow matching: `fastperc train --arch dit --schedule flow`, the
Euler flow sampler (the demo with both: tests/test_demo.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastperc import NoiseSchedule
from fastperc.recipes.cli import main
from fastperc.recipes.config import TrainConfig
from fastperc.recipes.models import load_model
from fastperc.recipes.sample import generate, sample_loop
from fastperc.recipes.train import train

TINY_DIT = dict(arch="dit", dit_width=16, dit_depth=2, schedule="flow", prediction_type="flow_prediction",
                conditional=True, batch_size=4, save_every=100, log_every=100, progress=False)


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("steps", [1, 7, 50])
def test_flow_sigmas_are_diffusers_euler_sigmas(shift, steps):
    diffusers = pytest.importorskip("diffusers")
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    sched.set_timesteps(steps)
    ours = NoiseSchedule.flow_matching(shift=shift).sigmas_for_sampling(steps)
    np.testing.assert_allclose(ours, sched.sigmas.double().numpy(), rtol=1e-6, atol=1e-7)


def test_flow_sampling_follows_flow_match_euler_steps(gen):
    """With a stand-in model, our loop and diffusers' scheduler.step give the same trajectory."""
    diffusers = pytest.importorskip("diffusers")
    w = torch.randn(1, 2, 1, 1, generator=gen)

    def model(x, t):  # a smooth function of x and t, as a velocity
        return x * w + (t / 1000)[:, None, None, None]

    noise = torch.randn(3, 2, 4, 4, generator=gen)
    ours = sample_loop(model, NoiseSchedule.flow_matching(shift=3.0), noise, steps=6, clip=False)
    sched = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    sched.set_timesteps(6)
    x = noise.clone()
    for t in sched.timesteps:
        x = sched.step(model(x, t.expand(3).float()), t, x).prev_sample
    torch.testing.assert_close(ours, x, rtol=1e-5, atol=1e-5)


def test_dit_on_flow_trains_both_stages_and_samples(tmp_path):
    mse = train(TrainConfig(out=str(tmp_path / "mse"), max_steps=3, **TINY_DIT))
    assert mse["step"] == 3 and np.isfinite(mse["loss"])
    sp = train(TrainConfig(out=str(tmp_path / "sp"), objective="self_perceptual", init=str(tmp_path / "mse"),
                           max_steps=2, layers=("blocks.0", "blocks.1"), feature_norm="channel_rms",
                           t_prime_range=(0, 100), **TINY_DIT))
    assert sp["step"] == 2 and np.isfinite(sp["loss"]) and sp["loss"] > 0
    model, config = load_model(str(tmp_path / "sp"), use_ema=True)
    assert config["schedule"]["kind"] == "flow_matching" and config["dit"] == {"width": 16, "depth": 2}
    images, labels = generate(model, config, 6, steps=3, cfg_scale=2.0)
    assert images.shape == (6, 32, 32) and images.dtype == np.uint8 and (labels >= 0).all()


def test_cli_flow_schedule_sets_the_flow_prediction_and_refuses_a_vp_one(tmp_path, capsys):
    common = ["train", "--arch", "dit", "--dit-width", "16", "--dit-depth", "2", "--batch-size", "4",
              "--max-steps", "1", "--no-progress"]
    assert main([*common, "--out", str(tmp_path / "a"), "--schedule", "flow"]) == 0
    model, config = load_model(str(tmp_path / "a"))
    assert config["prediction_type"] == "flow_prediction" and config["schedule"]["kind"] == "flow_matching"
    assert main([*common, "--out", str(tmp_path / "b"), "--schedule", "flow", "--prediction-type", "v_prediction"]) == 2
    assert "prediction_type: the flow schedule trains flow_prediction, got 'v_prediction'" in capsys.readouterr().err
    # A fine-tune takes the schedule and the DiT from --init; a disagreeing flag is named.
    assert main(["train", "--out", str(tmp_path / "c"), "--init", str(tmp_path / "a"), "--schedule", "ddpm",
                 "--max-steps", "1", "--batch-size", "4", "--no-progress"]) == 2
    assert "--schedule 'ddpm' disagrees" in capsys.readouterr().err


def test_a_dit_with_patches_of_2_and_logit_normal_t_trains_stores_its_patch_and_init_takes_it(tmp_path):
    run = train(TrainConfig(out=str(tmp_path / "mse"), max_steps=2, dit_patch=2, t_density="logit_normal",
                            t_loc=-0.5, **TINY_DIT))
    assert run["step"] == 2 and np.isfinite(run["loss"])
    model, config = load_model(str(tmp_path / "mse"), use_ema=True)
    assert config["dit"] == {"width": 16, "depth": 2, "patch": 2} and model.grid == 16  # 32 / 2: 256 tokens
    sp = train(TrainConfig(out=str(tmp_path / "sp"), objective="self_perceptual", init=str(tmp_path / "mse"),
                           max_steps=1, **{k: v for k, v in TINY_DIT.items() if k not in ("dit_width", "dit_depth")}))
    assert sp["step"] == 1 and load_model(str(tmp_path / "sp"))[1]["dit"]["patch"] == 2  # from --init


@pytest.mark.parametrize("option, value, message", [
    ("dit_patch", 3, "dit_patch: expected a divisor of image_size=32, got 3"),
    ("t_density", "beta", "t_density: expected one of"),
    ("mode_scale", -2.0, "mode_scale: expected a number in")])
def test_bad_dit_patch_and_t_density_options_are_refused(option, value, message, tmp_path):
    from fastperc import InputError
    with pytest.raises(InputError, match=message):
        TrainConfig(out=str(tmp_path / "r"), **{**TINY_DIT, option: value}).validate()
