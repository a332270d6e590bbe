"""The training loop (`fastperc.recipes.train`): the objectives learn, bad steps are skipped, the teacher
gets what the student got, gradient accumulation and several processes see one global batch."""
from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import torch

from fastperc.recipes import checkpoint
from fastperc.recipes.config import TrainConfig
from fastperc.recipes.train import train

from .helpers import TINY, assert_same_training_state, cli, log_rows, losses


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


def test_bf16_self_perceptual_step_runs_and_is_finite(mse_run, tmp_path):
    out = tmp_path / "bf16"
    result = train(TrainConfig(out=str(out), objective="self_perceptual", init=str(mse_run), conditional=True,
                               precision="bf16", max_steps=3, save_every=3, **TINY))
    assert result["step"] == 3 and np.isfinite(losses(out)).all()


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
    assert [r["bad_steps"] for r in log_rows(tmp_path / "five")] == [0, 0, 0, 1, 2]


def test_too_many_bad_steps_in_a_row_stop_the_run_with_the_good_weights_saved(tmp_path, monkeypatch):
    _poison_steps(monkeypatch, set(range(2, 100)))
    out = tmp_path / "diverged"
    with pytest.raises(RuntimeError, match=r"loss: 3 steps in a row up to step 5 had a NaN/Inf loss or gradient"):
        train(TrainConfig(out=str(out), max_steps=50, save_every=50, max_bad_steps=2, **TINY))
    state = checkpoint.load(out)
    assert state["step"] == 5 and int(state["counters"]["good"]) == 2
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_a_short_run_leaves_its_warm_up(tmp_path):
    train(TrainConfig(out=str(tmp_path / "r"), max_steps=20, save_every=20, **{**TINY, "warmup_steps": 100}))
    assert log_rows(tmp_path / "r")[-1]["lr"] == pytest.approx(TINY["lr"])  # capped at max_steps // 5 = 4 steps


def test_gradient_accumulation_sees_the_same_global_batch(tmp_path):
    """The global batch is drawn once per step and sliced (micro-batches here, ranks under DDP): two
    micro-batches of 4 give the losses and weights of one batch of 8, up to summation order."""
    base = TrainConfig(out=str(tmp_path / "one"), conditional=True, max_steps=3, save_every=3, **TINY)
    train(base)
    train(replace(base, out=str(tmp_path / "two"), grad_accum=2))
    np.testing.assert_allclose(losses(tmp_path / "one"), losses(tmp_path / "two"), rtol=1e-5)
    a, b = checkpoint.load(tmp_path / "one"), checkpoint.load(tmp_path / "two")
    va = torch.cat([v.flatten().float() for v in a["model"].values()])
    vb = torch.cat([v.flatten().float() for v in b["model"].values()])
    assert float((va - vb).abs().mean()) < 1e-5


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


@pytest.mark.parametrize("sp_fraction, grad_accum, k", [(0.25, 1, 2), (0.5, 2, 2), (1.0, 1, 8)])
def test_sp_fraction_runs_the_teacher_on_that_share_of_each_micro_batch(mse_run, tmp_path, monkeypatch,
                                                                         sp_fraction, grad_accum, k):
    seen = _record_teacher(monkeypatch)
    train(TrainConfig(out=str(tmp_path / "sp"), objective="self_perceptual", init=str(mse_run), conditional=True,
                      sp_fraction=sp_fraction, grad_accum=grad_accum, max_steps=1, save_every=1, **TINY))
    assert [len(kw["class_labels"]) for kw in seen["kwargs"]] == [k] * (2 * grad_accum)  # real + fake branches


@pytest.mark.parametrize("precision, dtype, fp8", [("same", None, False), ("bf16", torch.bfloat16, False),
                                                  ("fp8", torch.bfloat16, True)])
def test_teacher_precision_builds_the_teacher_it_names(mse_run, tmp_path, monkeypatch, precision, dtype, fp8):
    import fastperc.recipes.train as train_mod
    built = []
    real = train_mod.FrozenTeacher

    def record(model, *a, **k):
        teacher = real(model, *a, **k)
        built.append(teacher)
        return teacher

    monkeypatch.setattr(train_mod, "FrozenTeacher", record)
    cfg = TrainConfig(out=str(tmp_path / "sp"), objective="self_perceptual", init=str(mse_run), conditional=True,
                      teacher_precision=precision, max_steps=1, save_every=1, **TINY)
    train(cfg)
    (teacher,) = built
    assert teacher.dtype == dtype and bool(teacher.fp8_layers) == fp8
    assert np.isfinite(losses(tmp_path / "sp")).all()


@pytest.mark.slow
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
