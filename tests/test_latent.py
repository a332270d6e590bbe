"""The latent setting: the autoencoder, training and fine-tuning in its space, and samples decoded by it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fastperc.recipes import checkpoint, data
from fastperc.recipes.cli import main
from fastperc.recipes.latent import encode_images, load_autoencoder, of_model_config, train_autoencoder
from fastperc.recipes.sample import generate, sample_loop
from fastperc.recipes.models import null_class, schedule_of
from fastperc.recipes.config import TrainConfig
from fastperc.recipes.models import load_model
from fastperc.recipes.train import train

TINY = dict(block_channels=(8, 16), batch_size=8, lr=1e-3, warmup_steps=1, log_every=1, progress=False)


@pytest.fixture(scope="module")
def autoencoder(tmp_path_factory):
    out = tmp_path_factory.mktemp("ae")
    result = train_autoencoder(str(out), steps=3, batch_size=8, width=8, progress=False)
    return out, result


@pytest.fixture(scope="module")
def latent_run(autoencoder, tmp_path_factory):
    out = tmp_path_factory.mktemp("latent_mse")
    train(TrainConfig(out=str(out), latent=str(autoencoder[0]), conditional=True, max_steps=3, save_every=3, **TINY))
    return out


def test_autoencoder_latents_have_unit_variance_on_the_training_split(autoencoder):
    out, result = autoencoder
    ae = load_autoencoder(str(out))
    train_set, _ = data.mnist5k().split(500, 0)
    z = encode_images(ae, data.to_model_range(train_set.images))
    assert z.shape == (4500, 4, 8, 8)
    assert float(z.std()) == pytest.approx(1.0, rel=1e-4)
    assert result["scale"] == pytest.approx(float(ae.scale)) and np.isfinite(result["held_out_mse"])


def test_a_latent_run_keeps_its_autoencoder_and_samples_decode_to_pixels(autoencoder, latent_run):
    mconf = checkpoint.load(latent_run)["model_config"]
    assert (mconf["in_channels"], mconf["image_size"]) == (4, 8)
    ae_file, ae_kept = load_autoencoder(str(autoencoder[0])), of_model_config(mconf)
    for k, v in ae_file.state_dict().items():
        assert torch.equal(v, ae_kept.state_dict()[k]), k
    model, mconf = load_model(str(latent_run), use_ema=True)
    imgs, labels = generate(model, mconf, 6, steps=3, seed=4)
    assert imgs.shape == (6, 32, 32) and imgs.dtype == np.uint8 and labels.tolist() == [0, 1, 2, 3, 4, 5]
    # the same images by hand: unclipped latents from DDIM, then the stored decoder
    noise = torch.randn((6, 4, 8, 8), generator=torch.Generator().manual_seed(4))
    z = sample_loop(model.eval(), schedule_of(mconf), noise, steps=3, labels=torch.arange(6),
                    null_label=null_class(mconf), clip=False)
    assert float(z.abs().max()) > 0  # latents are not images: nothing clamps them
    expected = data.to_uint8(ae_kept.decode(z))[:, 0].numpy()
    assert np.abs(imgs.astype(int) - expected.astype(int)).max() <= 1


def test_self_perceptual_fine_tune_runs_in_latent_space(latent_run, tmp_path):
    out = tmp_path / "sp"
    result = train(TrainConfig(out=str(out), objective="self_perceptual", init=str(latent_run), conditional=True,
                               layers=("conv_in", "mid_block"), feature_norm="channel_rms", t_prime_range=(0, 100),
                               max_steps=2, save_every=2, **TINY))
    assert result["step"] == 2 and np.isfinite(result["loss"])
    assert "autoencoder" in checkpoint.load(out)["model_config"]


def test_latent_with_init_or_a_missing_autoencoder_is_refused(autoencoder, latent_run, tmp_path):
    with pytest.raises(ValueError, match=r"latent: --init .* sets the model and its space .* omit --latent"):
        train(TrainConfig(out=str(tmp_path / "a"), init=str(latent_run), latent=str(autoencoder[0]),
                          conditional=True, max_steps=1, **TINY))
    with pytest.raises(FileNotFoundError, match=r"latent: no autoencoder at .*nowhere.*train-autoencoder"):
        train(TrainConfig(out=str(tmp_path / "b"), latent=str(tmp_path / "nowhere"), max_steps=1, **TINY))
    rgb = tmp_path / "rgb.npz"
    np.savez(rgb, images=np.random.default_rng(0).integers(0, 256, (40, 32, 32, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match=r"latent: .* encodes 1-channel images, the data has 3 \(--channels\)"):
        train(TrainConfig(out=str(tmp_path / "c"), latent=str(autoencoder[0]), data=str(rgb), channels=3,
                          max_steps=1, **TINY))


def test_autoencoder_halves_twice_so_the_size_must_divide_by_four(autoencoder):
    with pytest.raises(ValueError, match="image_size: .* multiple of 4, got 30"):
        load_autoencoder(str(autoencoder[0])).latent_shape(30)
    with pytest.raises(ValueError, match="steps: expected >= 1, got 0"):
        train_autoencoder("unused", steps=0)


def test_cli_trains_an_autoencoder_then_a_latent_model(tmp_path, capsys):
    ae = tmp_path / "ae"
    assert main(["train-autoencoder", "--out", str(ae), "--steps", "2", "--width", "8"]) == 0
    assert "held-out reconstruction MSE" in capsys.readouterr().out
    assert main(["train", "--out", str(tmp_path / "m"), "--latent", str(ae), "--channels-per-level", "8,16",
                 "--batch-size", "8", "--max-steps", "2", "--no-progress"]) == 0
    assert checkpoint.load(tmp_path / "m")["model_config"]["in_channels"] == 4
