"""The whole training step, per objective: time, peak memory and host syncs, as a markdown table.

    python benchmarks/bench_step.py [--model default,sd-like] [--dtypes fp32,bf16] [--objectives ...]
                                    [--batch N] [--steps N] [--warmup N] [--device cuda|cpu] [--quick]

One row per (model, dtype, objective), all measured in this one run (ratios are within the run):
ms/step is the median of --steps timed steps (default 30) after --warmup untimed ones (forward + loss +
backward, no optimizer step), "IQR" their interquartile range (75th minus 25th percentile); "x mse" is
the ratio of medians to plain MSE's, for a compiled row to compiled MSE's; "peak" is the memory a step adds at its peak over what is resident before it (weights,
teacher copy, inputs): CUDA's max_memory_allocated on a GPU, the process's peak RSS (VmHWM, reset
through /proc/self/clear_refs) on a CPU, where glibc is told to return large blocks at once so the RSS
follows the live tensors. "syncs" counts the step's host syncs on a GPU (torch.cuda sync debug mode). "floor x mse" is the
step's FLOPs over MSE's (matmul, convolution and attention only, counted on the meta device by
step_cases.flop_floor; FP8 matmuls count half): what the work itself costs, beside what was measured.
"first s" is the first step's time (for compiled rows: the compile). Models and objectives: see
step_cases.py; by default each model gets its own list (step_cases.default_objectives).
--quick: tiny shapes, one timed step, compiled objectives only when named (the gpu_check.sh dry run:
proves the script).
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
from step_cases import OBJECTIVES, build, default_batch, default_objectives, flop_floor, make_step  # noqa: E402

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
    _sync(device)
    peak = peak_bytes(step, device)
    syncs = count_syncs(step, device)
    times = []
    for _ in range(steps):
        _sync(device)
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    q1, _, q3 = statistics.quantiles(times, n=4) if len(times) > 1 else (times[0],) * 3
    return {"ms": 1e3 * statistics.median(times), "iqr": 1e3 * (q3 - q1), "peak": peak, "syncs": syncs,
            "first": first, "steps": len(times)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default,sd-like",
                    help="comma list of default, sd-like, sd, sd3-512, sd3-1024, sd3-tiny")
    ap.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16 (bf16 = autocast)")
    ap.add_argument("--objectives", default=None, help=f"comma list of {', '.join(OBJECTIVES)} "
                    "(default: the model's own list)")
    ap.add_argument("--batch", type=int, default=None,
                    help="default: 32 (default), 8 (sd-like, sd, sd3-512), 4 (sd3-1024)")
    ap.add_argument("--steps", type=int, default=30, help="timed steps per row (median and IQR over them)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (the first is the compile)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--quick", action="store_true", help="tiny shapes, one timed step, compiled objectives only "
                    "when named")
    ap.add_argument("--compile-backend", default="inductor", help="torch.compile's backend for the compiled rows "
                    "(aot_eager: the same graphs, no code generation)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu" and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        # Large blocks straight from and back to the OS, so the peak RSS measures live tensors.
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "131072"}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    asked = None if args.objectives is None else [o for o in args.objectives.split(",") if o]
    for o in asked or ():
        if o not in OBJECTIVES:
            ap.error(f"--objectives: expected names from {', '.join(OBJECTIVES)}, got {o!r}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; torch {torch.__version__}", flush=True)
    steps = 1 if args.quick else args.steps
    for model in args.model.split(","):
        objectives = asked or [o for o in default_objectives(model) if not (args.quick and o.endswith("-compiled"))]
        batch = 2 if args.quick else (args.batch or default_batch(model))
        setup = build(model, device, batch)
        if args.quick:
            setup.x0 = setup.x0[:, :, :16, :16].contiguous()
        print(f"\n{setup.description}; forward + loss + backward; median and IQR of {steps} steps after "
              f"{args.warmup} untimed", flush=True)
        bases = dict.fromkeys(o.removesuffix("-compiled") for o in ["mse", *objectives])  # compiled: same work
        floors = {o: flop_floor(o, model, batch, 16 if args.quick else None) for o in bases}
        print(f"FLOP floor: matmul, convolution and attention FLOPs of a step (FlopCounterMode on the meta "
              f"device; FP8 matmuls count half; MSE {floors['mse'] / 1e9:.2f} GFLOP), as a ratio to MSE's",
              flush=True)
        print("| objective | dtype | ms/step | IQR ms | x mse | floor x mse | x trick | peak MiB | x mse peak | syncs | "
              "first s |\n|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
        for dname in args.dtypes.split(","):
            base = {}
            for objective in objectives:
                try:
                    step = make_step(objective, setup, DTYPES[dname], compile_backend=args.compile_backend)
                    r = measure(step, device, steps, warmup=max(1, args.warmup))
                except Exception as exc:  # one failing objective must not hide the others' numbers
                    print(f"| {objective} | {dname} | failed: {type(exc).__name__}: {str(exc)[:120]} |"
                          + " |" * 8, flush=True)
                    continue
                finally:
                    step = None
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                if objective in ("mse", "trick", "mse-compiled"):
                    base[objective] = r
                mse = "mse-compiled" if objective.endswith("-compiled") else "mse"  # like with like
                ratio = lambda key, k: (f"{r[key] / base[k][key]:.2f}" if k in base and base[k][key] > 0 else "-")  # noqa: E731
                syncs = "-" if r["syncs"] is None else str(r["syncs"])
                print(f"| {objective} | {dname} | {r['ms']:.1f} | {r['iqr']:.1f} | {ratio('ms', mse)} | "
                      f"{floors[objective.removesuffix('-compiled')] / floors['mse']:.2f} | {ratio('ms', 'trick')} | {r['peak'] / MIB:.0f} | {ratio('peak', mse)} | {syncs} | "
                      f"{r['first']:.1f} |", flush=True)
        setup = None
        gc.collect()


if __name__ == "__main__":
    main()
