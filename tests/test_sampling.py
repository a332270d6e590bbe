"""Sampling and evaluation (`fastperc sample`, `fastperc eval`): files written, reproducible by seed,
trailing timesteps, and clear errors for a checkpoint that does not fit or a missing classifier."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from fastperc.recipes import checkpoint
from fastperc.recipes.cli import main
from fastperc.recipes.models import load_model


def test_sample_writes_npz_and_png(mse_run, tmp_path):
    assert main(["sample", str(mse_run), "--out", str(tmp_path / "s.npz"), "--n", "12", "--steps", "4",
                 "--cfg-scale", "2", "--guidance-rescale", "0.5"]) == 0
    with np.load(tmp_path / "s.npz") as f:
        images, labels = f["images"], f["labels"]
    assert images.dtype == np.uint8 and images.shape == (12, 32, 32)
    assert labels.shape == (12,) and set(labels.tolist()) <= set(range(10))
    assert images.std() > 0
    from PIL import Image
    with Image.open(tmp_path / "s.png") as im:
        assert im.size[0] > 32 and im.size[1] > 32


def test_sampling_is_reproducible_by_seed(mse_run):
    from fastperc.recipes.sample import generate
    model, conf = load_model(str(mse_run), use_ema=True)
    a, _ = generate(model, conf, 4, steps=3, seed=5)
    b, _ = generate(model, conf, 4, steps=3, seed=5)
    c, _ = generate(model, conf, 4, steps=3, seed=6)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_vp_sampling_timesteps_are_trailing_and_start_at_the_last_step():
    from fastperc import NoiseSchedule
    ts = NoiseSchedule.scaled_linear().sampling_timesteps(50).tolist()
    assert ts[0] == 999 and ts[-1] == 19 and len(ts) == 50 and ts == sorted(ts, reverse=True)


def test_a_checkpoint_that_does_not_fit_the_model_is_one_line_exit_2(mse_run, tmp_path, capsys):
    state = checkpoint.load(mse_run)
    state["model_config"] = {**state["model_config"], "block_channels": [8, 32]}  # weights no longer fit
    checkpoint.save(state, tmp_path / "bad.pt")
    code = main(["sample", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "s.npz"), "--n", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fastperc sample: error: ") and err.count("\n") == 1, err


def test_eval_finds_the_classifier_beside_the_samples(mse_run, one_epoch_classifier, capsys):
    root = Path(one_epoch_classifier["checkpoint"]).parents[1]  # the folder that holds classifier/
    assert main(["sample", str(mse_run), "--out", str(root / "s" / "x.npz"), "--n", "10", "--steps", "2"]) == 0
    assert main(["eval", str(root / "s" / "x.npz")]) == 0
    assert "FD-MNIST" in capsys.readouterr().out
    assert main(["eval", str(mse_run / "nowhere.npz")]) == 2
    assert "classifier: none given and no classifier/ folder beside" in capsys.readouterr().err


def test_the_old_sampler_names_are_deprecated_aliases_of_the_one_loop(gen):
    from fastperc import NoiseSchedule
    from fastperc.recipes.sample import ddim_sample, euler_flow_sample, sample_loop

    def model(x, t):
        return 0.5 * x
    noise = torch.randn(2, 1, 4, 4, generator=gen)
    for old, schedule in ((ddim_sample, NoiseSchedule.scaled_linear()), (euler_flow_sample,
                                                                          NoiseSchedule.flow_matching())):
        with pytest.warns(DeprecationWarning, match="use sample_loop"):
            got = old(model, schedule, noise, steps=3)
        assert torch.equal(got, sample_loop(model, schedule, noise, steps=3))


def test_guidance_on_an_unconditional_model_is_refused_not_silently_skipped(mse_run):
    from fastperc.errors import InputError
    from fastperc.recipes.sample import generate
    model, config = load_model(str(mse_run))
    unconditional = {**config, "num_classes": None}
    with pytest.raises(InputError, match="cfg_scale: classifier-free guidance needs a conditional model; got 1.5"):
        generate(model, unconditional, 4, steps=2, cfg_scale=1.5)
