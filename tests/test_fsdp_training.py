"""`fastperc train --fsdp`: the student, its EMA and optimizer state and the teacher sharded with FSDP2 over
two CPU processes (gloo). The same global batch gives the one-process losses; an interrupted run resumes
to the uninterrupted one exactly; the checkpoint is plain (sampled in one process, resumed without --fsdp)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastperc.recipes import checkpoint
from fastperc.recipes.config import TrainConfig
from fastperc.recipes.sharded import by_name
from fastperc.recipes.train import train

from .helpers import TINY, assert_same_training_state, cli, losses

ARGS = ["--batch-size", "8", "--channels-per-level", "8,16", "--lr", "1e-3", "--warmup-steps", "1", "--log-every",
        "1", "--save-every", "2", "--no-progress", "--conditional"]


def torchrun(port: int, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(port), "-m", "fastperc", *args], capture_output=True, text=True, timeout=600, env=env)


def test_fsdp_in_one_process_is_refused(tmp_path):
    with pytest.raises(ValueError, match="fsdp: shards over several processes; run under torchrun"):
        train(TrainConfig(out=str(tmp_path / "r"), fsdp=True, max_steps=1, **TINY))


def test_an_optimizer_state_keyed_by_position_is_keyed_by_name():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    opt = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 2)).sum().backward()
    opt.step()
    named = by_name(model, opt.state_dict())
    assert list(named["state"]) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert named["param_groups"][0]["params"] == ["0.weight", "0.bias", "1.weight", "1.bias"]
    assert by_name(model, named) is named
    with pytest.raises(ValueError, match="optimizer: the checkpoint's optimizer holds 4 parameters, the model 2"):
        by_name(torch.nn.Linear(2, 3), opt.state_dict())


@pytest.mark.slow
def test_fsdp_training_matches_one_process_and_resumes_exactly(tmp_path):
    mse_one = cli("train", *ARGS, "--max-steps", "4", "--out", str(tmp_path / "mse_one"))
    assert mse_one.returncode == 0, mse_one.stderr[-3000:]
    mse = torchrun(29541, "train", *ARGS, "--max-steps", "4", "--fsdp", "--out", str(tmp_path / "mse"))
    assert mse.returncode == 0, mse.stderr[-3000:]
    assert np.allclose(losses(tmp_path / "mse"), losses(tmp_path / "mse_one"), rtol=1e-5, atol=0)

    # The self-perceptual stage, with gradient accumulation (FSDP2's gradient sync held until the last
    # micro-batch): interrupted at step 2 and resumed to 4, against the uninterrupted run.
    sp = ["train", *ARGS, "--fsdp", "--objective", "self_perceptual", "--init", str(tmp_path / "mse"),
          "--grad-accum", "2"]
    full = torchrun(29542, *sp, "--max-steps", "4", "--out", str(tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    cut = torchrun(29543, *sp, "--max-steps", "2", "--out", str(tmp_path / "cut"))
    assert cut.returncode == 0, cut.stderr[-3000:]
    resumed = torchrun(29544, *sp, "--max-steps", "4", "--out", str(tmp_path / "cut"), "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert losses(tmp_path / "cut") == losses(tmp_path / "full")
    assert_same_training_state(checkpoint.load(tmp_path / "full"), checkpoint.load(tmp_path / "cut"))

    # The checkpoint is plain: sampled in one process, and resumed there without --fsdp.
    sample = cli("sample", str(tmp_path / "full"), "--out", str(tmp_path / "s.npz"), "--n", "4", "--steps", "2")
    assert sample.returncode == 0, sample.stderr[-3000:]
    one = cli(*[a for a in sp if a != "--fsdp"], "--max-steps", "5", "--out", str(tmp_path / "full"), "--resume")
    assert one.returncode == 0, one.stderr[-3000:]
    assert checkpoint.load(tmp_path / "full")["step"] == 5
