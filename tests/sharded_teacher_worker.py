"""Run by tests/test_sharded_teacher.py under torchrun (two CPU processes, gloo): the self-perceptual loss
with a teacher sharded by FrozenTeacher.shard, against the same loss with a whole teacher in this process.
Every rank gets the same batch, so the sharded run must give the single-process loss and gradients.
Prints one JSON line per case (rank 0)."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import fastperc  # noqa: E402
from fastperc import FrozenTeacher, NoiseSchedule, self_perceptual_loss  # noqa: E402
from tests.test_diffusers import cond_unet  # noqa: E402
from tests.test_transformer_teachers import ARCHS, timesteps  # noqa: E402

SCHEDULE = NoiseSchedule.scaled_linear()
FLOW = NoiseSchedule.flow_matching(shift=3.0)


def batch(kind: str, g: torch.Generator):
    if kind == "unet":
        x0 = torch.randn(4, 4, 8, 8, generator=g)
        return x0, torch.randn(x0.shape, generator=g), torch.tensor([3, 200, 500, 990]), torch.tensor([10, 300, 100, 999]), \
            {"encoder_hidden_states": torch.randn(4, 5, 16, generator=g)}, SCHEDULE
    if kind == "fastperc_unet":
        x0 = torch.randn(4, 1, 16, 16, generator=g)
        return x0, torch.randn(x0.shape, generator=g), torch.tensor([3, 200, 500, 990]), torch.tensor([10, 300, 100, 999]), {}, \
            SCHEDULE
    arch = ARCHS["sd3"]
    x0 = torch.randn(arch.shape, generator=g)
    return x0, torch.randn(x0.shape, generator=g), timesteps(arch, g), timesteps(arch, g), arch.kwargs(g), FLOW


def make(kind: str):
    torch.manual_seed(0)
    if kind == "unet":
        return cond_unet()
    if kind == "fastperc_unet":
        from fastperc.models import UNet
        return UNet(block_channels=(16, 32, 64))
    return ARCHS["sd3"].make()


def step(student, teacher, data) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x0, noise, t, t2, kw, schedule = data
    student.zero_grad(set_to_none=True)
    x_t = schedule.add_noise(x0, noise, t)
    out = student(x_t, t, **kw) if not kw else student(x_t, timestep=t, **kw)
    v = out.sample if hasattr(out, "sample") else out
    loss = self_perceptual_loss(teacher, v, x0, noise, t, schedule, timesteps_prime=t2, teacher_kwargs=kw)
    loss.backward()
    grads = [p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad for p in student.parameters()]
    return loss.detach(), [g.clone() for g in grads]


def compare(case: str, kind: str, student_wrap: str, shard_options: dict, **teacher_options) -> dict:
    g = torch.Generator().manual_seed(1)
    data = batch(kind, g)
    plain = make(kind)
    whole_teacher = FrozenTeacher(plain, **teacher_options)
    want_loss, want_grads = step(plain, whole_teacher, data)

    student = make(kind)
    if student_wrap == "ddp":
        from torch.nn.parallel import DistributedDataParallel
        student = DistributedDataParallel(student)
        teacher = FrozenTeacher(student, **teacher_options)
    elif student_wrap == "fsdp2":
        from torch.distributed.fsdp import fully_shard
        for block in list(student.down_blocks) + [student.mid_block] + list(student.up_blocks):
            fully_shard(block)
        fully_shard(student)
        teacher = FrozenTeacher(student, **teacher_options)  # rebuilt from the shards, pruned
    else:
        teacher = FrozenTeacher(student, **teacher_options)
    whole_bytes = teacher.held_bytes
    teacher.shard(**shard_options)
    got_loss, got_grads = step(student, teacher, data)
    got_loss2, _ = step(student, teacher, data)  # a second step: blocks gathered again after resharding
    return {"case": case, "rank": dist.get_rank(), "loss_equal": bool(torch.equal(got_loss, want_loss)),
            "loss_close": bool(torch.allclose(got_loss, want_loss, rtol=1e-6, atol=1e-8)),
            "second_equal": bool(torch.equal(got_loss2, got_loss)),
            "grads_close": all(torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(got_grads, want_grads)),
            "share": teacher.held_bytes / whole_bytes, "units": len(teacher.shard_units),
            "loss": float(got_loss)}


def main() -> None:
    dist.init_process_group("gloo")
    cases = [("unet, plain student", "unet", "plain", {}),
             ("unet, DDP student", "unet", "ddp", {}),
             ("unet, FSDP2 student", "unet", "fsdp2", {}),
             ("unet, blocks kept gathered", "unet", "plain", {"reshard_after_forward": False}),
             ("fastperc UNet", "fastperc_unet", "plain", {}),
             ("SD3 transformer", "sd3", "plain", {})]
    results = [compare(*c) for c in cases]
    results.append(compare("unet, checkpointed", "unet", "plain", {}, checkpoint=True))
    results.append(compare("SD3 transformer, FP8", "sd3", "plain", {}, fp8=True))
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        for per_rank in zip(*gathered):
            for r in per_rank:
                print(json.dumps(r), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    fastperc.ops  # the loss's ops load before the process group starts
    main()
