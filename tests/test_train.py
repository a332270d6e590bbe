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

from fastperc.recipes import checkpoint
from fastperc.recipes.cli import main
from fastperc.recipes.config import TrainConfig
from fastperc.recipes.models import load_model
from fastperc.recipes.train import train

TINY = dict(block_channels=(8, 16), batch_size=8, lr=1e-3, warmup_steps=1, log_every=1, progress=False,
            held_out=500)


def losses(run: Path) -> list[float]:
    rows = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in rows if "event" not in r]


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


def assert_same_training_state(a: dict, b: dict) -> None:
    """Every tensor of the model, the EMA and the optimizer state, and the step, are equal."""
    assert a["step"] == b["step"]
    for part in ("model", "ema"):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), f"{part}.{k}"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), f"optimizer.state[{i}].{k}"
    for k in a["counters"]:
        assert torch.equal(a["counters"][k], b["counters"][k]), f"counters.{k}"


def test_resumed_run_repeats_the_uninterrupted_run(tmp_path):
    base = TrainConfig(out=str(tmp_path / "full"), max_steps=6, save_every=3, ema_decay=0.9, **TINY)
    train(base)
    part = replace(base, out=str(tmp_path / "part"))
    train(replace(part, max_steps=3))
    train(replace(part, resume=True))
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    assert_same_training_state(checkpoint.load(tmp_path / "full"), checkpoint.load(tmp_path / "part"))


def _wait_for_log_lines(log: Path, n: int, proc, deadline_s: float = 180) -> None:
    deadline = time.time() + deadline_s
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().count("\n") >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"{log} did not reach {n} lines (process exit code {proc.poll()})")


def test_sigterm_then_kill_9_then_resume_gives_the_uninterrupted_run(tmp_path):
    args = ["train", "--max-steps", "60", "--batch-size", "4", "--channels-per-level", "8,16", "--lr", "1e-3",
            "--warmup-steps", "5", "--log-every", "1", "--save-every", "7", "--ema-decay", "0.95", "--no-progress",
            "--conditional"]
    full = cli(*args, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "cut"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def start(*extra):
        return subprocess.Popen([sys.executable, "-m", "fastperc", *args, "--out", str(out), *extra], env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    proc = start()
    _wait_for_log_lines(out / "log.jsonl", 10, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]

    proc = start("--resume")
    first_after_resume = checkpoint.load(out)["step"]
    _wait_for_log_lines(out / "log.jsonl", first_after_resume + 12, proc)
    proc.kill()  # SIGKILL: no handler runs, the process dies between two saves
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    saved = checkpoint.load(out)["step"]
    logged = max(json.loads(ln)["step"] for ln in (out / "log.jsonl").read_text().splitlines()
                 if "loss" in json.loads(ln))
    assert 0 <= logged - saved < 7, (logged, saved)  # lost at most the steps since the last save

    done = cli(*args, "--out", str(out), "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(out) == losses(tmp_path / "full")
    assert_same_training_state(checkpoint.load(tmp_path / "full"), checkpoint.load(out))
    assert checkpoint.previous(out / "checkpoint.pt").exists(), "the previous checkpoint is kept"


def test_a_corrupt_checkpoint_names_the_file_and_the_kept_previous_one(tmp_path):
    out = tmp_path / "run"
    train(TrainConfig(out=str(out), max_steps=4, save_every=2, **TINY))
    good = checkpoint.load(checkpoint.previous(out / "checkpoint.pt"))
    assert good["step"] == 2
    data = (out / "checkpoint.pt").read_bytes()
    (out / "checkpoint.pt").write_bytes(data[: len(data) // 2])  # truncated on disk
    with pytest.raises(ValueError, match=r"checkpoint\.pt is not a readable checkpoint .*previous checkpoint is "
                                         r"kept as .*checkpoint\.prev\.pt"):
        train(TrainConfig(out=str(out), max_steps=6, save_every=2, resume=True, **TINY))


def _poison_steps(monkeypatch, bad_steps: set[int]):
    """Make the loss of the given (0-based) steps NaN, as a diverging batch would."""
    import fastperc.recipes.train as train_mod
    real, calls = train_mod._objective, {"n": 0}

    def objective(*a, **k):
        loss = real(*a, **k)
        step, calls["n"] = calls["n"], calls["n"] + 1
        return loss * float("nan") if step in bad_steps else loss

    monkeypatch.setattr(train_mod, "_objective", objective)


def test_non_finite_steps_change_neither_weights_nor_ema_nor_adam(tmp_path, monkeypatch):
    cfg = TrainConfig(out=str(tmp_path / "three"), max_steps=3, save_every=3, ema_decay=0.9, **TINY)
    train(cfg)
    _poison_steps(monkeypatch, {3, 4})
    train(replace(cfg, out=str(tmp_path / "five"), max_steps=5, save_every=5))
    a, b = checkpoint.load(tmp_path / "three"), checkpoint.load(tmp_path / "five")
    b["step"] = a["step"]  # five steps ran; the last two were skipped
    assert int(b["counters"]["good"]) == 3 and int(b["counters"]["bad"]) == 2
    b["counters"] = a["counters"] | {"bad": b["counters"]["bad"] * 0, "bad_in_row": b["counters"]["bad_in_row"] * 0}
    assert_same_training_state(a, b)
    log = [json.loads(ln) for ln in (tmp_path / "five" / "log.jsonl").read_text().splitlines()]
    assert [r["bad_steps"] for r in log] == [0, 0, 0, 1, 2]


def test_too_many_bad_steps_in_a_row_stop_the_run_with_the_good_weights_saved(tmp_path, monkeypatch):
    _poison_steps(monkeypatch, set(range(2, 100)))
    out = tmp_path / "diverged"
    with pytest.raises(RuntimeError, match=r"loss: 3 steps in a row up to step 5 had a NaN/Inf loss or gradient"):
        train(TrainConfig(out=str(out), max_steps=50, save_every=50, max_bad_steps=2, **TINY))
    state = checkpoint.load(out)
    assert state["step"] == 5 and int(state["counters"]["good"]) == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_a_finished_run_resumed_says_it_is_finished(tmp_path, capsys):
    args = ["train", "--out", str(tmp_path / "r"), "--max-steps", "2", "--batch-size", "4", "--channels-per-level",
            "8,16", "--no-progress", "--log-every", "1"]
    assert main(args) == 0
    assert "done: 2 steps, loss" in capsys.readouterr().out
    assert main(args + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "already finished: 2 steps" in out and "nan" not in out


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
    from fastperc.recipes.sample import generate
    model, conf = load_model(str(mse_run), use_ema=True)
    a, _ = generate(model, conf, 4, steps=3, seed=5)
    b, _ = generate(model, conf, 4, steps=3, seed=5)
    c, _ = generate(model, conf, 4, steps=3, seed=6)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_trailing_timesteps_start_at_the_last_step():
    from fastperc.recipes.sample import trailing_timesteps
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
    from fastperc.recipes.data import load
    imgs = np.random.default_rng(0).integers(0, 255, (10, 32, 32), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=imgs, labels=np.arange(10) % 3)
    s = load(str(tmp_path / "d.npz"))
    assert s.images.shape == (10, 1, 32, 32) and s.num_classes == 3


def test_mnist5k_is_padded_scaled_and_split_deterministically():
    from fastperc.recipes.data import mnist5k, to_model_range
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
    from fastperc.recipes.demo import PRESETS, SP_BEST, run
    result = run(str(tmp_path), "quick", progress=False)
    for name in ("samples_mse", "samples_mse_cfg", "samples_sp", "samples_sp_paper", "samples_uncond_mse",
                 "samples_uncond_sp"):
        with np.load(tmp_path / f"{name}.npz") as f:
            assert f["images"].shape == (20, 32, 32)
        assert (tmp_path / f"{name}.png").exists()
    assert not (tmp_path / "samples_uncond_sp_paper.npz").exists()  # the quick preset's paper_rows: conditional
    assert set(result["seconds"]) >= {"mse", "sp", "sp_paper", "mse_cont", "uncond_mse", "uncond_sp", "classifier"}
    # the fine-tunes: the search's best configuration, the paper's, and the MSE continuation, all at finetune_lr
    configs = {k: checkpoint.load(tmp_path / k)["config"] for k in ("sp", "sp_paper", "mse_cont", "uncond_sp")}
    assert {k: c["lr"] for k, c in configs.items()} == dict.fromkeys(configs, PRESETS["quick"]["finetune_lr"])
    for k in ("sp", "uncond_sp"):
        assert configs[k]["objective"] == "self_perceptual" and configs[k]["teacher"].endswith(k.replace("sp", "mse"))
        assert {o: configs[k][o] for o in SP_BEST} == SP_BEST
    assert tuple(configs["sp_paper"]["layers"]) == ("mid_block",) and configs["sp_paper"]["t_prime_range"] is None
    assert configs["mse_cont"]["objective"] == "mse"
    text = (tmp_path / "report.md").read_text()
    assert "conditional: self-perceptual (4 taps, channel RMS, t' in [0, 100]), no guidance" in text
    assert "conditional: self-perceptual (the paper's: midblock, t' uniform), no guidance" in text
    assert "unconditional: MSE" in text
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
    from fastperc.recipes import demo
    monkeypatch.setitem(demo.PRESETS, "full", dict(demo.PRESETS["quick"], training_seeds=(0, 1)))
    result = demo.run(str(tmp_path), "full", progress=False)
    assert (tmp_path / "seed0" / "report.md").exists() and (tmp_path / "seed1" / "report.md").exists()
    text = (tmp_path / "report.md").read_text()
    assert "training seeds [0, 1]" in text and "conditional: self-perceptual (4 taps" in text
    assert result["summary"]["sp"]["seeds"] == 2


def _record_teacher(monkeypatch):
    """Records what the training loop gives the teacher: its weights and its keyword arguments."""
    import fastperc.recipes.train as train_mod
    seen = {"weights": None, "kwargs": [], "student_labels": []}
    real_teacher, real_predict = train_mod.FrozenTeacher, train_mod.predict

    class Recording(real_teacher):
        def __init__(self, model, *a, **k):
            seen["weights"] = {n: v.clone() for n, v in model.state_dict().items()}
            super().__init__(model, *a, **k)

        def forward(self, sample, timestep, **kwargs):
            seen["kwargs"].append(kwargs)
            return super().forward(sample, timestep, **kwargs)

    def predict(net, x_t, t, labels):
        seen["student_labels"].append(labels)
        return real_predict(net, x_t, t, labels)

    monkeypatch.setattr(train_mod, "FrozenTeacher", Recording)
    monkeypatch.setattr(train_mod, "predict", predict)
    return seen


def test_the_teacher_is_the_raw_mse_model_not_its_ema(mse_run, tmp_path, monkeypatch):
    init = checkpoint.load(mse_run)
    assert any(not torch.equal(init["model"][k], init["ema"][k]) for k in init["model"]), "the case needs EMA != raw"
    seen = _record_teacher(monkeypatch)
    train(TrainConfig(out=str(tmp_path / "sp"), objective="self_perceptual", init=str(mse_run), conditional=True,
                      max_steps=1, save_every=1, **TINY))
    assert seen["weights"].keys() == init["model"].keys()
    for k, v in seen["weights"].items():
        assert torch.equal(v, init["model"][k]), k


def test_the_teacher_sees_the_class_labels_the_student_got(mse_run, tmp_path, monkeypatch):
    seen = _record_teacher(monkeypatch)
    train(TrainConfig(out=str(tmp_path / "sp"), objective="self_perceptual", init=str(mse_run), conditional=True,
                      max_steps=2, save_every=2, **TINY))
    assert len(seen["kwargs"]) == 4 and len(seen["student_labels"]) == 2  # real + fake branch per step
    for step, labels in enumerate(seen["student_labels"]):
        for call in seen["kwargs"][2 * step: 2 * step + 2]:
            assert torch.equal(call["class_labels"], labels)


def test_a_checkpoint_that_does_not_fit_the_model_is_one_line_exit_2(mse_run, tmp_path, capsys):
    state = checkpoint.load(mse_run)
    state["model_config"] = {**state["model_config"], "block_channels": [8, 32]}  # weights no longer fit
    checkpoint.save(state, tmp_path / "bad.pt")
    code = main(["sample", str(tmp_path / "bad.pt"), "--out", str(tmp_path / "s.npz"), "--n", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("fastperc sample: error: ") and err.count("\n") == 1, err


def test_the_progress_bar_never_shows_nan(tmp_path):
    r = cli("train", "--out", str(tmp_path / "r"), "--max-steps", "4", "--batch-size", "4", "--channels-per-level",
            "8,16", "--log-every", "3")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "loss=" in r.stderr and "nan" not in r.stderr.lower(), r.stderr[-2000:]


def test_a_folder_holding_a_run_is_not_overwritten_without_resume_or_overwrite(tmp_path, capsys):
    args = ["train", "--out", str(tmp_path / "r"), "--max-steps", "2", "--batch-size", "4", "--channels-per-level",
            "8,16", "--no-progress", "--log-every", "1"]
    assert main(args) == 0
    before = (tmp_path / "r" / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "holds a run (checkpoint.pt" in err and "pass --resume to continue it or --overwrite" in err
    assert (tmp_path / "r" / "checkpoint.pt").read_bytes() == before
    assert main(args + ["--overwrite", "--seed", "5"]) == 0
    assert checkpoint.load(tmp_path / "r")["config"]["seed"] == 5
    assert not checkpoint.previous(tmp_path / "r" / "checkpoint.pt").exists()  # the old run is gone entirely


def test_init_fills_the_model_options_and_refuses_explicit_conflicts(mse_run, tmp_path, capsys):
    base = ["train", "--init", str(mse_run), "--max-steps", "1", "--batch-size", "4", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0  # conditional, 8,16 from the checkpoint
    assert checkpoint.load(tmp_path / "a")["model_config"]["num_classes"] == 10
    capsys.readouterr()
    code = main(base + ["--out", str(tmp_path / "b"), "--channels-per-level", "32,64", "--prediction-type", "epsilon"])
    err = capsys.readouterr().err
    assert code == 2 and "--channels-per-level (32, 64) disagrees with" in err and "'v_prediction'" in err
    assert main(base + ["--out", str(tmp_path / "c"), "--conditional", "--channels-per-level", "8,16"]) == 0


def test_help_shows_defaults_and_version_prints(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "(default: 0.0002)" in text and "(default: 1000)" in text
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("fastperc ")


def test_every_cli_option_has_help():
    from fastperc.recipes.cli import build_parser
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, __import__("argparse")._SubParsersAction))
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in subs.choices.items() for a in p._actions
               if not a.help and a.dest != "help"]
    assert not missing, missing


def test_a_short_run_leaves_its_warm_up(tmp_path):
    train(TrainConfig(out=str(tmp_path / "r"), max_steps=20, save_every=20, **{**TINY, "warmup_steps": 100}))
    rows = [json.loads(ln) for ln in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert rows[-1]["lr"] == pytest.approx(TINY["lr"])  # capped at max_steps // 5 = 4 steps


def test_a_resumed_run_logs_the_resume_and_keeps_elapsed_monotonic(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "r"), max_steps=4, save_every=2, **TINY)
    train(replace(cfg, max_steps=2))
    train(replace(cfg, resume=True))
    rows = [json.loads(ln) for ln in (tmp_path / "r" / "log.jsonl").read_text().splitlines()]
    assert [r.get("event") for r in rows] == [None, None, "resumed", None, None] and rows[2]["step"] == 2
    elapsed = [r["elapsed"] for r in rows]
    assert elapsed == sorted(elapsed)


def test_eval_finds_the_classifier_beside_the_samples(mse_run, tmp_path, capsys):
    from fastperc.recipes import metrics
    metrics.train_classifier(str(tmp_path / "classifier"), epochs=1, progress=False)
    assert main(["sample", str(mse_run), "--out", str(tmp_path / "s" / "x.npz"), "--n", "10", "--steps", "2"]) == 0
    assert main(["eval", str(tmp_path / "s" / "x.npz")]) == 0
    assert "FD-MNIST" in capsys.readouterr().out
    assert main(["eval", str(mse_run / "nowhere.npz")]) == 2
    assert "classifier: none given and no classifier/ folder beside" in capsys.readouterr().err


def test_resuming_with_other_training_options_is_refused_naming_them(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "r"), max_steps=2, save_every=2, **TINY)
    train(cfg)
    with pytest.raises(ValueError, match=r"resume: .*checkpoint.pt was trained with other options "
                                         r"\(layers: checkpoint \['mid_block'\], now \['conv_in'\]; "
                                         r"lr: checkpoint 0.001, now 0.0005\)"):
        train(replace(cfg, resume=True, max_steps=4, lr=5e-4, layers=("conv_in",)))
    # where and how long a run goes may change
    result = train(replace(cfg, resume=True, max_steps=3, save_every=3, log_every=3))
    assert result["step"] == 3


def test_a_stage_interrupted_by_a_signal_stops_the_demo_with_that_signal(tmp_path, monkeypatch):
    from fastperc.recipes import demo
    stages = []

    def interrupted_at_the_second_stage(cfg):
        stages.append(Path(cfg.out).name)
        signum = 15 if len(stages) == 2 else 0
        return {"interrupted": signum, "step": 1, "steps_run": 1, "loss": 0.5, "finished": not signum}

    monkeypatch.setattr(demo, "train", interrupted_at_the_second_stage)
    result = demo.run(str(tmp_path), "quick", 0, progress=False, resume=False)
    assert result == {"interrupted": 15} and stages == ["mse", "sp"]  # nothing after the interrupted stage
