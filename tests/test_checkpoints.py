"""Checkpoints and resume: saves are atomic, a resumed run repeats the uninterrupted one, a signal saves
and stops, a corrupt or foreign file is a clear error, a finished or existing run is never overwritten."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from fastperc.recipes import checkpoint
from fastperc.recipes.cli import main
from fastperc.recipes.config import TrainConfig
from fastperc.recipes.train import train

from .helpers import TINY, assert_same_training_state, cli, log_rows, losses


def test_resumed_run_repeats_the_uninterrupted_run(tmp_path):
    base = TrainConfig(out=str(tmp_path / "full"), max_steps=6, save_every=3, ema_decay=0.9, **TINY)
    train(base)
    part = replace(base, out=str(tmp_path / "part"))
    train(replace(part, max_steps=3))
    train(replace(part, resume=True))
    assert losses(tmp_path / "part") == losses(tmp_path / "full")
    assert_same_training_state(checkpoint.load(tmp_path / "full"), checkpoint.load(tmp_path / "part"))


def _signal_at_step(monkeypatch, step: int, signum: int = signal.SIGTERM):
    """Deliver `signum` to this process during the given (0-based) step, as `kill` from a shell would."""
    import fastperc.recipes.train as train_mod
    real = train_mod.train_step

    def train_step(run, s, warmup):
        if s == step:
            os.kill(os.getpid(), signum)
        return real(run, s, warmup)

    monkeypatch.setattr(train_mod, "train_step", train_step)


def test_a_signal_saves_at_the_end_of_the_step_and_a_resume_repeats_the_uninterrupted_run(tmp_path, monkeypatch):
    base = TrainConfig(out=str(tmp_path / "full"), max_steps=6, save_every=100, ema_decay=0.9, **TINY)
    train(base)
    cut = replace(base, out=str(tmp_path / "cut"))
    handler_before = signal.getsignal(signal.SIGTERM)
    with monkeypatch.context() as m:
        _signal_at_step(m, 2)
        result = train(cut)
    assert result["interrupted"] == signal.SIGTERM and result["step"] == 3 and not result["finished"]
    assert checkpoint.load(tmp_path / "cut")["step"] == 3
    assert not list((tmp_path / "cut").glob(".*.tmp")), "a temporary checkpoint was left behind"
    assert signal.getsignal(signal.SIGTERM) == handler_before, "the run's handler outlived the run"
    assert train(replace(cut, resume=True))["finished"]
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    assert_same_training_state(checkpoint.load(tmp_path / "full"), checkpoint.load(tmp_path / "cut"))


def test_a_signal_through_the_cli_exits_128_plus_the_signal(tmp_path, monkeypatch, capsys):
    _signal_at_step(monkeypatch, 1)
    code = main(["train", "--out", str(tmp_path / "r"), "--max-steps", "50", "--batch-size", "4",
                 "--channels-per-level", "8,16", "--no-progress", "--log-every", "1"])
    assert code == 128 + signal.SIGTERM
    assert "interrupted at step 2" in capsys.readouterr().err
    state = checkpoint.load(tmp_path / "r")
    assert state["step"] == 2 and "optimizer" in state and "ema" in state


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


def test_a_finished_run_resumed_says_it_is_finished(tmp_path, capsys):
    args = ["train", "--out", str(tmp_path / "r"), "--max-steps", "2", "--batch-size", "4", "--channels-per-level",
            "8,16", "--no-progress", "--log-every", "1"]
    assert main(args) == 0
    assert "done: 2 steps, loss" in capsys.readouterr().out
    assert main(args + ["--resume"]) == 0
    out = capsys.readouterr().out
    assert "already finished: 2 steps" in out and "nan" not in out


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


def test_a_resumed_run_logs_the_resume_and_keeps_elapsed_monotonic(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "r"), max_steps=4, save_every=2, **TINY)
    train(replace(cfg, max_steps=2))
    train(replace(cfg, resume=True))
    rows = log_rows(tmp_path / "r")
    assert [r.get("event") for r in rows] == [None, None, "resumed", None, None] and rows[2]["step"] == 2
    elapsed = [r["elapsed"] for r in rows]
    assert elapsed == sorted(elapsed)


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


def test_a_resumed_run_takes_its_model_options_from_its_checkpoint(tmp_path):
    cfg = TrainConfig(out=str(tmp_path / "r"), max_steps=2, save_every=2, **TINY)
    train(cfg)
    # unset model options come from the checkpoint being resumed (not from the defaults)...
    resumed = replace(cfg, resume=True, max_steps=3, block_channels=None)
    assert train(resumed)["step"] == 3
    # ... and one that disagrees with it is named
    with pytest.raises(ValueError, match=r"resume: --channels-per-level \(16, 32\) disagrees with .*checkpoint.pt"):
        train(replace(cfg, resume=True, max_steps=4, block_channels=(16, 32)))


# ---- end to end: real signals to a separate process ---------------------------------------------------
def _wait_for_log_lines(log: Path, n: int, proc, deadline_s: float = 180) -> None:
    deadline = time.time() + deadline_s
    while time.time() < deadline and proc.poll() is None:
        if log.exists() and log.read_text().count("\n") >= n:
            return
        time.sleep(0.02)
    raise AssertionError(f"{log} did not reach {n} lines (process exit code {proc.poll()})")


def _popen(*command) -> subprocess.Popen:
    """A training process of its own (one thread), its output kept for the failure message."""
    return subprocess.Popen([sys.executable, "-m", *command], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.slow
def test_sigterm_then_kill_9_then_resume_gives_the_uninterrupted_run(tmp_path):
    args = ["train", "--max-steps", "60", "--batch-size", "4", "--channels-per-level", "8,16", "--lr", "1e-3",
            "--warmup-steps", "5", "--log-every", "1", "--save-every", "7", "--ema-decay", "0.95", "--no-progress",
            "--conditional"]
    full = cli(*args, "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]

    out = tmp_path / "cut"

    def start(*extra):
        return _popen("fastperc", *args, "--out", str(out), *extra)

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
    # Lost at most the steps since the last save: 7 when the kill lands between a save step's log line and
    # its checkpoint (the log is written first).
    assert 0 <= logged - saved <= 7, (logged, saved)

    done = cli(*args, "--out", str(out), "--resume")
    assert done.returncode == 0, done.stderr[-3000:]
    assert losses(out) == losses(tmp_path / "full")
    assert_same_training_state(checkpoint.load(tmp_path / "full"), checkpoint.load(out))
    assert checkpoint.previous(out / "checkpoint.pt").exists(), "the previous checkpoint is kept"


@pytest.mark.slow
def test_sigterm_saves_a_loadable_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = _popen("fastperc", "train", "--out", str(out), "--max-steps", "100000", "--batch-size", "4",
                  "--channels-per-level", "8,16", "--log-every", "1", "--save-every", "100000", "--no-progress")
    _wait_for_log_lines(out / "log.jsonl", 2, proc, deadline_s=120)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "interrupted at step" in err
    state = checkpoint.load(out)
    assert state["step"] >= 2 and "optimizer" in state and "ema" in state
    assert not list(out.glob(".*.tmp")), "a temporary checkpoint was left behind"


@pytest.mark.slow
def test_two_processes_stop_together_at_a_logging_step_on_sigterm(tmp_path):
    """torchrun forwards SIGTERM to both workers; they agree on it at the next logging step (no step
    reads the host for it), save once and stop."""
    out = tmp_path / "ddp"
    proc = _popen("torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29519", "-m", "fastperc",
                  "train", "--out", str(out), "--max-steps", "100000", "--batch-size", "8", "--channels-per-level",
                  "8,16", "--log-every", "3", "--save-every", "100000", "--no-progress")
    _wait_for_log_lines(out / "log.jsonl", 2, proc, deadline_s=180)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=180)
    state = checkpoint.load(out)
    logged = [json.loads(ln)["step"] for ln in (out / "log.jsonl").read_text().splitlines()]
    assert state["step"] % 3 == 0 and state["step"] == logged[-1] >= 6, (state["step"], logged, err[-2000:])
    assert not list(out.glob(".*.tmp")), "a temporary checkpoint was left behind"
