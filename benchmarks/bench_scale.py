"""Total training memory per teacher form: weights + optimizer + one step, as a markdown table.

    python benchmarks/bench_scale.py [--model sd] [--batch 8] [--device cuda|cpu] [--quick]

Rows (the same student, AdamW, bf16 autocast on a GPU, measured in this one run):
  mse                 plain MSE (the baseline)
  full teacher        fastperc with FrozenTeacher(prune=False): a whole frozen copy
  pruned teacher      fastperc with the default FrozenTeacher: only what runs up to the tap
  pruned + checkpoint the pruned teacher with checkpoint=True (the fake branch recomputed in backward)

"total peak" is everything the run holds at its peak, from before the student is built through two
optimizer steps: CUDA's max_memory_allocated on a GPU, the growth of the process's peak RSS on a CPU
(--quick: tiny shapes on a CPU, which proves the script, not the numbers). The goal for the pruned +
checkpointed teacher: at most 1.10x the MSE step's total.
"""
from __future__ import annotations

import argparse
import gc
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from bench_step import _status_kib  # noqa: E402
from step_cases import build  # noqa: E402

ROWS = {"mse": None, "full teacher": dict(prune=False), "pruned teacher": dict(),
        "pruned + checkpoint": dict(checkpoint=True)}
GIB = 2**30


def _reset_peak(device) -> int:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak RSS) to the current RSS
    return _status_kib("VmRSS") * 1024


def _peak(device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    return _status_kib("VmHWM") * 1024


def total_peak(row: str, model: str, device: torch.device, batch: int, steps: int = 2) -> tuple[int, int]:
    """(total peak bytes of the run, teacher bytes held) for one row, from a clean start."""
    from fastperc import FrozenTeacher, NoiseSchedule, self_perceptual_loss
    before = _reset_peak(device)
    setup = build(model, device, batch)
    student, x0, kw = setup.student, setup.x0, setup.kwargs
    opt = torch.optim.AdamW(student.parameters(), lr=1e-5)
    options = ROWS[row]
    teacher = FrozenTeacher(student, ("mid_block",), **options) if options is not None else None
    schedule = NoiseSchedule.scaled_linear()
    gen = torch.Generator(device=device).manual_seed(1)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    for _ in range(steps):
        noise = torch.randn(x0.shape, generator=gen, device=device)
        t = torch.randint(0, 1000, (x0.shape[0],), generator=gen, device=device)
        with autocast:
            v = student(schedule.add_noise(x0, noise, t), t, **kw)
            v = v.sample if hasattr(v, "sample") else v
            if teacher is None:
                loss = F.mse_loss(v.float(), schedule.velocity(x0, noise, t).float())
            else:
                loss = self_perceptual_loss(teacher, v, x0, noise, t, schedule, teacher_kwargs=kw)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    peak = _peak(device) - before
    held = teacher.held_bytes if teacher is not None else 0
    del setup, student, opt, teacher
    return peak, held


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="sd", choices=["default", "sd-like", "sd"])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes on a CPU (proves the script)")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.batch = "default", 4
    device = torch.device(args.device)
    total_peak("mse", args.model, device, args.batch, steps=1)  # warm-up: one-time allocations land here
    results = {row: total_peak(row, args.model, device, args.batch) for row in ROWS}
    base = results["mse"][0]
    print(f"model {args.model}, batch {args.batch}, {device.type}"
          f"{' (bf16 autocast, fp32 weights, AdamW)' if device.type == 'cuda' else ' (fp32, AdamW; RSS: indicative only)'}\n")
    print("| row | total peak | x MSE | teacher held |\n| --- | --- | --- | --- |")
    for row, (peak, held) in results.items():
        print(f"| {row} | {peak / GIB:.2f} GiB | {peak / base:.2f}x | {held / GIB:.2f} GiB |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
