"""The whole training step, per objective: time, peak memory and host syncs, as a markdown table.

    python benchmarks/bench_step.py [--model default,sd-like] [--dtypes fp32,bf16] [--objectives ...]
                                    [--batch N] [--steps N] [--device cuda|cpu] [--quick]

One row per (model, dtype, objective), all measured in this one run (ratios are within the run):
ms/step is the median of --steps timed steps after warm-up (forward + loss + backward, no optimizer
step); "peak" is the memory a step adds at its peak over what is resident before it (weights,
teacher copy, inputs): CUDA's max_memory_allocated on a GPU, the process's peak RSS (VmHWM, reset
through /proc/self/clear_refs) on a CPU, where glibc is told to return large blocks at once so the RSS
follows the live tensors. "syncs" counts the step's host syncs on a GPU (torch.cuda sync debug mode). "floor x mse" is the
step's FLOPs over MSE's (matmul, convolution and attention only, counted on the meta device by
step_cases.flop_floor): what the work itself costs, beside what was measured.
"first s" is the first step's time (for compiled rows: the compile). Objectives: see step_cases.py.
--quick: tiny shapes, eager objectives only (the gpu_check.sh dry run: proves the script).
"""
from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from step_cases import OBJECTIVES, build, flop_floor, make_step  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16}
MIB = 2**20


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def peak_bytes(step, device) -> int:
    """Memory one step adds at its peak over what is resident before it."""
    gc.collect()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        return torch.cuda.max_memory_allocated(device) - before
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM (the peak RSS) to the current RSS
    before = _status_kib("VmRSS")
    step()
    return (_status_kib("VmHWM") - before) * 1024


def count_syncs(step, device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
            _sync(device)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def measure(step, device, steps: int, warmup: int) -> dict:
    t0 = time.perf_counter()
    step()
    _sync(device)
    first = time.perf_counter() - t0
    for _ in range(warmup - 1):
        step()
    peak = peak_bytes(step, device)
    syncs = count_syncs(step, device)
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return {"ms": 1e3 * statistics.median(times), "spread": 1e3 * (max(times) - min(times)) if len(times) > 1 else 0.0,
            "peak": peak, "syncs": syncs, "first": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default,sd-like", help="comma list of default, sd-like, sd")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16 (bf16 = autocast)")
    ap.add_argument("--objectives", default=",".join(OBJECTIVES))
    ap.add_argument("--batch", type=int, default=None, help="default: 32 (default model), 8 (sd-like, sd)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, eager objectives only")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # Large blocks straight from and back to the OS, so the peak RSS measures live tensors.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    objectives = [o for o in args.objectives.split(",") if o]
    for o in objectives:
        if o not in OBJECTIVES:
            ap.error(f"--objectives: expected names from {', '.join(OBJECTIVES)}, got {o!r}")
    if args.quick:
        objectives = [o for o in objectives if not o.endswith("-compiled")]
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    for model in args.model.split(","):
        batch = 2 if args.quick else (args.batch or (32 if model == "default" else 8))
        setup = build(model, device, batch)
        if args.quick:
            setup.x0 = setup.x0[:, :, :16, :16].contiguous()
        print(f"\n{setup.description}; forward + loss + backward; median of {args.steps} steps", flush=True)
        bases = dict.fromkeys(o.removesuffix("-compiled") for o in ["mse", *objectives])  # compiled: same work
        floors = {o: flop_floor(o, model, batch, 16 if args.quick else None) for o in bases}
        print(f"FLOP floor: matmul, convolution and attention FLOPs of a step (FlopCounterMode on the meta "
              f"device; MSE {floors['mse'] / 1e9:.2f} GFLOP), as a ratio to MSE's", flush=True)
        print("| objective | dtype | ms/step | spread ms | x mse | floor x mse | x trick | peak MiB | x mse peak | syncs | "
              "first s |\n|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
        for dname in args.dtypes.split(","):
            base = {}
            for objective in objectives:
                try:
                    step = make_step(objective, setup, DTYPES[dname])
                    r = measure(step, device, 1 if args.quick else args.steps,
                                warmup=2 if objective.endswith("-compiled") else 1)
                except Exception as exc:  # one failing objective must not hide the others' numbers
                    print(f"| {objective} | {dname} | failed: {type(exc).__name__}: {str(exc)[:120]} |"
                          + " |" * 8, flush=True)
                    continue
                finally:
                    step = None
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                if objective in ("mse", "trick"):
                    base[objective] = r
                ratio = lambda key, k: (f"{r[key] / base[k][key]:.2f}" if k in base and base[k][key] > 0 else "-")  # noqa: E731
                syncs = "-" if r["syncs"] is None else str(r["syncs"])
                print(f"| {objective} | {dname} | {r['ms']:.1f} | {r['spread']:.1f} | {ratio('ms', 'mse')} | "
                      f"{floors[objective.removesuffix('-compiled')] / floors['mse']:.2f} | {ratio('ms', 'trick')} | {r['peak'] / MIB:.0f} | {ratio('peak', 'mse')} | {syncs} | "
                      f"{r['first']:.1f} |", flush=True)
        setup = None
        gc.collect()


if __name__ == "__main__":
    main()
