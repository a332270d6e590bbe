"""Print a table of the fused ops per backend: time, GB/s and % of copy bandwidth, measured in one run.

    python benchmarks/bench_ops.py [--device cuda] [--min-time 0.3] [--markdown] [--no-step] [--quick]

--quick swaps in tiny shapes (the gpu_check.sh dry run: proves the script, measures nothing useful).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch.utils import benchmark

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cases import (DTYPES, FEATURE_CASES, QUICK_FEATURE_CASES, QUICK_RENOISE_CASES, RENOISE_CASES,  # noqa: E402
                   backends_for, copy_bandwidth, feature_mse_case, loss_step_case, renoise_case)


def measure(fn, min_time: float) -> float:
    fn()
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_time).median


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--min-time", type=float, default=0.3)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--no-step", action="store_true", help="skip the training-step table")
    ap.add_argument("--no-ops", action="store_true", help="skip the op table")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: checks the script, not the speed")
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    feature_cases = QUICK_FEATURE_CASES if args.quick else FEATURE_CASES
    renoise_cases = QUICK_RENOISE_CASES if args.quick else RENOISE_CASES
    if not args.no_ops:
        op_table(device, name, feature_cases, renoise_cases, args)
    if not args.no_step:
        step_table(device, args)


def op_table(device, name, feature_cases, renoise_cases, args) -> None:
    bw = copy_bandwidth(device, 1 << 20 if args.quick else 1 << 28)
    print(f"device: {name}; torch {torch.__version__}; copy bandwidth {bw:.1f} GB/s")
    rows = []
    for dname, dtype in DTYPES.items():
        for case, shapes in feature_cases.items():
            base = None
            for be in backends_for(device):
                for consume in (False, True) if be != "reference" else (False,):
                    fn, nbytes = feature_mse_case(shapes, dtype, device, be, consume)
                    sec = measure(fn, args.min_time)
                    base = base or sec
                    op = "feature_mse consume" if consume else "feature_mse"
                    rows.append((op, be, dname, case, sec, nbytes / sec / 1e9, base / sec))
        for case, shape in renoise_cases.items():
            base = None
            for be in backends_for(device):
                fn, nbytes = renoise_case(shape, dtype, device, be)
                sec = measure(fn, args.min_time)
                base = base or sec
                rows.append(("renoise", be, dname, case, sec, nbytes / sec / 1e9, base / sec))
    print_table(rows, bw, args.markdown)


def step_table(device, args) -> None:
    batch = 2 if args.quick else 32
    step_rows = []
    for objective in ("mse", "sp-reference", "sp-fused", "sp-untruncated"):
        step_rows.append((objective, measure(loss_step_case(objective, device, batch=batch), args.min_time)))
    base = step_rows[0][1]
    print(f"\ntraining step, default conditional UNet, batch {batch}, 1x32x32, fp32 (forward + loss + backward)")
    if args.markdown:
        print("| objective | ms/step | x plain MSE |\n|---|---|---|")
    for objective, sec in step_rows:
        if args.markdown:
            print(f"| {objective} | {sec * 1e3:.1f} | {sec / base:.2f} |")
        else:
            print(f"{objective:16s} {sec * 1e3:9.1f} ms {sec / base:6.2f}x")


def print_table(rows, bw: float, markdown: bool) -> None:
    head = ("op", "backend", "dtype", "size", "time ms", "GB/s", "% copy bw", "x reference")
    if markdown:
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    else:
        print(f"{head[0]:20s} {head[1]:9s} {head[2]:5s} {head[3]:44s} {head[4]:>9s} {head[5]:>8s} {head[6]:>9s} {head[7]:>11s}")
    for op, be, dn, case, sec, gbs, speed in rows:
        cells = (op, be, dn, case, f"{sec * 1e3:.3f}", f"{gbs:.1f}", f"{100 * gbs / bw:.0f}%", f"{speed:.2f}")
        if markdown:
            print("| " + " | ".join(cells) + " |")
        else:
            print(f"{cells[0]:20s} {cells[1]:9s} {cells[2]:5s} {cells[3]:44s} {cells[4]:>9s} {cells[5]:>8s} "
                  f"{cells[6]:>9s} {cells[7]:>11s}")


if __name__ == "__main__":
    main()
