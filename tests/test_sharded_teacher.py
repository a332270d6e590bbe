"""FrozenTeacher.shard: FSDP2 over what the pruned teacher holds. In one process (fast): the blocks it shards,
what it refuses, the same features. Under torchrun with two CPU processes (slow): the loss and the
student's gradients equal a whole teacher's, beside a plain, a DDP and an FSDP2 student, and each rank holds
half of the teacher."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastperc import FrozenTeacher
from fastperc.models import UNet

from .test_diffusers import cond_unet
from .test_transformer_teachers import ARCHS, timesteps

ROOT = Path(__file__).resolve().parents[1]


def test_shard_needs_a_process_group():
    with pytest.raises(ValueError, match=r"shard: needs torch.distributed initialised"):
        FrozenTeacher(UNet(block_channels=(8, 16))).shard()


def test_shard_splits_the_blocks_keeps_the_embeddings_whole_and_gives_the_same_features(one_process_group, gen):
    model = cond_unet().eval()
    whole = FrozenTeacher(model)
    teacher = FrozenTeacher(model).shard()
    assert teacher.shard_units == ("down_blocks.0", "down_blocks.1", "mid_block")  # not the time embedding
    assert teacher.held_bytes == whole.held_bytes  # one process: its shard is everything
    x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([5, 700])
    kw = {"encoder_hidden_states": torch.randn(2, 5, 16, generator=gen)}
    xs, xw = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = teacher(xs, t, **kw)[0], whole(xw, t, **kw)[0]
    assert torch.equal(got, want)
    got.square().sum().backward()
    want.square().sum().backward()
    torch.testing.assert_close(xs.grad, xw.grad)
    with pytest.raises(ValueError, match="shard: this teacher is already sharded"):
        teacher.shard()
    with pytest.raises(ValueError, match="dtype: a sharded model is not cast in place"):
        FrozenTeacher(teacher, dtype=torch.bfloat16, copy=False)


@pytest.mark.slow
def test_two_processes_with_a_sharded_teacher_give_the_single_process_loss_and_gradients():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                        "29531", str(ROOT / "tests" / "sharded_teacher_worker.py")], capture_output=True, text=True,
                       timeout=900, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
    cases = {row["case"] for row in rows}
    assert {"unet, plain student", "unet, DDP student", "unet, FSDP2 student", "unet, blocks kept gathered",
            "fastperc UNet", "SD3 transformer", "unet, checkpointed", "SD3 transformer, FP8"} == cases and len(rows) == 2 * len(cases)
    for row in rows:
        assert row["loss_close"] and row["grads_close"] and row["second_equal"], row
        assert 0.45 <= row["share"] <= 0.6, row  # each of two ranks holds about half


def test_prune_then_cast_then_shard_is_the_order_and_gives_the_cast_teachers_features(one_process_group, gen):
    model = cond_unet().eval()
    cast = FrozenTeacher(model, dtype=torch.bfloat16)  # pruned and cast when built
    teacher = FrozenTeacher(model, dtype=torch.bfloat16).shard()  # sharded last
    assert teacher.pruned == cast.pruned and teacher.held_bytes == cast.held_bytes
    assert teacher.held_bytes * 2 == FrozenTeacher(model).held_bytes
    x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([5, 700])
    kw = {"encoder_hidden_states": torch.randn(2, 5, 16, generator=gen)}
    assert torch.equal(teacher(x, t, **kw)[0], cast(x, t, **kw)[0])


def test_a_copy_of_a_sharded_teacher_is_plain_pruned_alike_and_gives_its_features(one_process_group, gen):
    model = cond_unet().eval()
    sharded = FrozenTeacher(model).shard()
    plain = FrozenTeacher(sharded)  # rebuilt from the shards, without what the source left out
    assert plain.pruned == sharded.pruned and plain.shard_units == () and plain.model.up_blocks is None
    x, t = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([5, 700])
    kw = {"encoder_hidden_states": torch.randn(2, 5, 16, generator=gen)}
    assert torch.equal(plain(x, t, **kw)[0], sharded(x, t, **kw)[0])


def test_an_fp8_teacher_shards_after_quantising_and_gives_its_features(one_process_group, gen):
    arch = ARCHS["sd3"]
    model = arch.make().eval()
    whole = FrozenTeacher(model, fp8=True)
    teacher = FrozenTeacher(model, fp8=True).shard()  # pruned, quantised and cast when built; sharded last
    assert teacher.fp8_layers == whole.fp8_layers and teacher.held_bytes == whole.held_bytes
    x = torch.randn(arch.shape, generator=gen)
    t, kw = timesteps(arch, gen), arch.kwargs(gen)
    xs, xw = x.clone().requires_grad_(), x.clone().requires_grad_()
    got, want = teacher(xs, t, **kw)[0], whole(xw, t, **kw)[0]
    assert torch.equal(got, want)
    got.float().square().sum().backward()
    want.float().square().sum().backward()
    assert torch.equal(xs.grad, xw.grad) and xs.grad.abs().sum() > 0
