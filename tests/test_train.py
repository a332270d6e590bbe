"""The training loop, checkpoints, DDP, sampling and the CLI, on tiny configs."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from fastperc import checkpoint
from fastperc.cli import main
from fastperc.train import TrainConfig, load_model, train

TINY = dict(block_channels=(8, 16), batch_size=8, lr=1e-3, warmup_steps=1, log_every=1, progress=False,
            held_out=500)


def losses(run: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]


def cli(*args, timeout=300, env_extra=None):
    env = {**os.environ, **(env_extra or {}), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "fastperc", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def mse_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mse")
    train(TrainConfig(out=str(out), conditional=True, max_steps=40, save_every=40, **TINY))
    return out


def test_mse_training_lowers_the_loss(mse_run):
    ls = losses(mse_run)
    assert len(ls) == 40 and all(np.isfinite(ls))
    assert np.mean(ls[-10:]) < 0.8 * np.mean(ls[:5])


def test_self_perceptual_training_lowers_the_loss(mse_run, tmp_path):
    out = tmp_path / "sp"
    train(TrainConfig(out=str(out), objective="self_perceptual", init=str(mse_run), conditional=True,
                      max_steps=40, save_every=40, **TINY))
    ls = losses(out)
    assert len(ls) == 40 and all(np.isfinite(ls)) and ls[0] > 0
    assert np.mean(ls[-10:]) < np.mean(ls[:10])


def test_self_perceptual_without_teacher_is_refused(tmp_path):
    with pytest.raises(ValueError, match="teacher"):
        train(TrainConfig(out=str(tmp_path), objective="self_perceptual", max_steps=1, **TINY))


def test_resumed_run_repeats_the_uninterrupted_loss_sequence(tmp_path):
    base = TrainConfig(out=str(tmp_path / "full"), max_steps=6, save_every=3, **TINY)
    train(base)
    part = replace(base, out=str(tmp_path / "part"))
    train(replace(part, max_steps=3))
    train(replace(part, resume=True))
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    a = checkpoint.load(tmp_path / "full")
    b = checkpoint.load(tmp_path / "part")
    assert a["step"] == b["step"] == 6
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k


def test_two_processes_match_one_with_the_same_global_batch(tmp_path):
    args = ["train", "--max-steps", "3", "--batch-size", "8", "--channels-per-level", "8,16", "--lr", "1e-3",
            "--warmup-steps", "1", "--log-every", "1", "--no-progress", "--conditional"]
    one = cli(*args, "--out", str(tmp_path / "one"))
    assert one.returncode == 0, one.stderr[-3000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29517", "-m", "fastperc", *args, "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    assert np.allclose(losses(tmp_path / "one"), losses(tmp_path / "two"), rtol=1e-5, atol=0)
    a, b = checkpoint.load(tmp_path / "one"), checkpoint.load(tmp_path / "two")
    va = torch.cat([v.flatten().float() for v in a["model"].values()])
    vb = torch.cat([v.flatten().float() for v in b["model"].values()])
    diff = (va - vb).abs()
    # The all-reduce sums in another order; Adam divides by sqrt(v), so parameters whose gradients are
    # ~0 can move by up to ~lr on rounding alone. Nearly all parameters must agree tightly, all within lr.
    assert float((diff > 1e-5).float().mean()) < 0.05 and float(diff.max()) < 3 * 1e-3
    assert float(diff.mean()) < 1e-5


def test_sigterm_saves_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fastperc", "train", "--out", str(out), "--max-steps", "100000",
                             "--batch-size", "4", "--channels-per-level", "8,16", "--log-every", "1",
                             "--save-every", "100000", "--no-progress"], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    log = out / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (log.exists() and log.read_text().count("\n") >= 2):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "interrupted at step" in err
    state = checkpoint.load(out)
    assert state["step"] >= 2 and "optimizer" in state and "ema" in state
    assert not list(out.glob(".*.tmp")), "a temporary checkpoint was left behind"


def test_sample_writes_npz_and_png(mse_run, tmp_path):
    r = cli("sample", str(mse_run), "--out", str(tmp_path / "s.npz"), "--n", "12", "--steps", "4",
            "--cfg-scale", "2", "--guidance-rescale", "0.5")
    assert r.returncode == 0, r.stderr[-3000:]
    with np.load(tmp_path / "s.npz") as f:
        images, labels = f["images"], f["labels"]
    assert images.dtype == np.uint8 and images.shape == (12, 32, 32)
    assert labels.shape == (12,) and set(labels.tolist()) <= set(range(10))
    assert images.std() > 0
    from PIL import Image
    with Image.open(tmp_path / "s.png") as im:
        assert im.size[0] > 32 and im.size[1] > 32


def test_sampling_is_reproducible_by_seed(mse_run):
    from fastperc.sample import generate
    model, conf = load_model(str(mse_run), use_ema=True)
    a, _ = generate(model, conf, 4, steps=3, seed=5)
    b, _ = generate(model, conf, 4, steps=3, seed=5)
    c, _ = generate(model, conf, 4, steps=3, seed=6)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_trailing_timesteps_start_at_the_last_step():
    from fastperc.sample import trailing_timesteps
    ts = trailing_timesteps(1000, 50)
    assert ts[0] == 999 and ts[-1] == 19 and len(ts) == 50 and ts == sorted(ts, reverse=True)


def test_data_folder_with_class_subfolders_trains(tmp_path):
    from PIL import Image
    rng = np.random.default_rng(0)
    for cls in ("cats", "dogs"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (20, 24), dtype=np.uint8)).save(tmp_path / "imgs" / cls / f"{i}.png")
    out = tmp_path / "run"
    r = cli("train", "--out", str(out), "--data", str(tmp_path / "imgs"), "--image-size", "16", "--conditional",
            "--max-steps", "2", "--batch-size", "4", "--channels-per-level", "8,16", "--no-progress")
    assert r.returncode == 0, r.stderr[-3000:]
    assert checkpoint.load(out)["model_config"]["num_classes"] == 2


def test_data_npz_is_read(tmp_path):
    from fastperc.data import load
    imgs = np.random.default_rng(0).integers(0, 255, (10, 32, 32), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=imgs, labels=np.arange(10) % 3)
    s = load(str(tmp_path / "d.npz"))
    assert s.images.shape == (10, 1, 32, 32) and s.num_classes == 3


def test_mnist5k_is_padded_scaled_and_split_deterministically():
    from fastperc.data import mnist5k, to_model_range
    d = mnist5k()
    assert d.images.shape == (5000, 1, 32, 32) and d.images.dtype == torch.uint8 and d.num_classes == 10
    x = to_model_range(d.images)
    assert x.min() == -1 and x.max() == 1
    a_train, a_held = d.split(500, seed=3)
    b_train, b_held = d.split(500, seed=3)
    assert len(a_train) == 4500 and torch.equal(a_held.images, b_held.images)


@pytest.mark.parametrize("args, message", [
    (["train", "--out", "x", "--objective", "l1"], "invalid choice"),
    (["train", "--out", "x", "--max-steps", "-3"], "expected a value >= 0"),
    (["train", "--out", "x", "--lr", "0"], "expected a value > 0"),
    (["sample", "missing.pt", "--out", "s.npz", "--n", "-1"], "expected a value > 0"),
])
def test_bad_cli_values_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_missing_data_path_exits_2_with_message(tmp_path, capsys):
    code = main(["train", "--out", str(tmp_path), "--data", str(tmp_path / "nope"), "--max-steps", "1"])
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_missing_and_corrupt_checkpoints_are_clear_errors(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "none.pt"), "--out", str(tmp_path / "s.npz")]) == 2
    assert "does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        checkpoint.load(bad)
    torch.save({"weights": 1}, tmp_path / "foreign.pt")
    with pytest.raises(ValueError, match="is not a fastperc-checkpoint"):
        checkpoint.load(tmp_path / "foreign.pt")


def test_checkpoint_save_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    checkpoint.save({"step": 1}, path)

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        checkpoint.save({"step": 2}, path)
    assert checkpoint.load(path)["step"] == 1
    assert not list(tmp_path.glob(".*.tmp"))


def test_demo_quick_preset_writes_samples_report_and_pictures(tmp_path):
    from fastperc.demo import run
    result = run(str(tmp_path), "quick", progress=False)
    for name in ("samples_mse", "samples_mse_cfg", "samples_sp", "samples_uncond_mse", "samples_uncond_sp"):
        with np.load(tmp_path / f"{name}.npz") as f:
            assert f["images"].shape == (20, 32, 32)
        assert (tmp_path / f"{name}.png").exists()
    assert set(result["seconds"]) >= {"mse", "sp", "mse_cont", "uncond_mse", "uncond_sp", "classifier"}
    text = (tmp_path / "report.md").read_text()
    assert "conditional: self-perceptual, no guidance" in text and "unconditional: MSE" in text
    assert "FD-MNIST" in text and "FID" not in text.replace("not FID", "")
    for png in ("grids.png", "fd_vs_cfg.png"):
        assert (tmp_path / png).stat().st_size > 1000
    assert np.isfinite(result["summary"]["sp"]["fd"][0])


def test_bf16_self_perceptual_step_runs_and_is_finite(mse_run, tmp_path):
    out = tmp_path / "bf16"
    result = train(TrainConfig(out=str(out), objective="self_perceptual", init=str(mse_run), conditional=True,
                               precision="bf16", max_steps=3, save_every=3, **TINY))
    assert result["step"] == 3 and np.isfinite(losses(out)).all()


def test_full_preset_reports_the_spread_over_training_seeds(tmp_path, monkeypatch):
    from fastperc import demo
    monkeypatch.setitem(demo.PRESETS, "full", dict(demo.PRESETS["quick"], training_seeds=(0, 1)))
    result = demo.run(str(tmp_path), "full", progress=False)
    assert (tmp_path / "seed0" / "report.md").exists() and (tmp_path / "seed1" / "report.md").exists()
    text = (tmp_path / "report.md").read_text()
    assert "training seeds [0, 1]" in text and "conditional: self-perceptual, no guidance" in text
    assert result["summary"]["sp"]["seeds"] == 2
