"""Print a table of the fused ops per backend: time, GB/s and % of copy bandwidth, measured in one run.

    python benchmarks/bench_ops.py [--device cuda] [--min-time 0.3] [--markdown] [--quick]

On a GPU each case is also timed replayed from a CUDA graph ("graph ms"): eager calls of these sizes
are bound by host code (Python, dispatch, launches), so the kernels' bandwidth is read from the graph.
The whole training step is bench_step.py's.

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
                   backends_for, capture_graph, copy_bandwidth, feature_mse_case, renoise_case)


def measure(fn, min_time: float) -> float:
    fn()
    return benchmark.Timer("fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_time).median


def measure_graph(fn, min_time: float) -> float | str:
    """Seconds per call replayed from a CUDA graph: the kernels and their launch gaps without the host
    code (Python, dispatch), which dominates eager calls at these sizes. A message if capture fails."""
    try:
        graph = capture_graph(fn)
    except Exception as exc:  # noqa: BLE001  (reported in the table)
        torch.cuda.synchronize()
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}" if str(exc) else type(exc).__name__
    return measure(graph.replay, min_time)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--min-time", type=float, default=0.3)
    ap.add_argument("--markdown", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny shapes: checks the script, not the speed")
    args = ap.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    feature_cases = QUICK_FEATURE_CASES if args.quick else FEATURE_CASES
    renoise_cases = QUICK_RENOISE_CASES if args.quick else RENOISE_CASES
    op_table(device, name, feature_cases, renoise_cases, args)


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
                    op = "feature_mse consume" if consume else "feature_mse"
                    base = add_row(rows, (op, be, dname, case), fn, nbytes, base, device, args.min_time)
        for case, shape in renoise_cases.items():
            base = None
            for be in backends_for(device):
                fn, nbytes = renoise_case(shape, dtype, device, be)
                base = add_row(rows, ("renoise", be, dname, case), fn, nbytes, base, device, args.min_time)
    print_table(rows, bw, args.markdown)


def add_row(rows, key, fn, nbytes, base, device, min_time):
    """Time `fn` eagerly and (on a GPU) from a graph; bandwidth from the graph time where there is one.
    Returns the reference's time, the first row's of each case, for the speed-up column."""
    eager = measure(fn, min_time)
    graph = measure_graph(fn, min_time) if device.type == "cuda" else None
    sec = graph if isinstance(graph, float) else eager
    base = base or sec
    rows.append((*key, eager, graph, nbytes / sec / 1e9, base / sec))
    return base


def print_table(rows, bw: float, markdown: bool) -> None:
    """GB/s, % of copy bandwidth and the speed-up use the graph time where one was measured (GPU)."""
    head = ("op", "backend", "dtype", "size", "eager ms", "graph ms", "GB/s", "% copy bw", "x reference")
    lines = []
    for op, be, dn, case, eager, graph, gbs, speed in rows:
        g = "-" if graph is None else (f"{graph * 1e3:.3f}" if isinstance(graph, float) else f"no capture ({graph})")
        lines.append((op, be, dn, case, f"{eager * 1e3:.3f}", g, f"{gbs:.1f}", f"{100 * gbs / bw:.0f}%", f"{speed:.2f}"))
    if markdown:
        print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
        for cells in lines:
            print("| " + " | ".join(cells) + " |")
    else:
        widths = [max(len(str(c)) for c in col) for col in zip(head, *lines)]
        for cells in (head, *lines):
            print("  ".join(str(c).ljust(w) for c, w in zip(cells, widths)))


if __name__ == "__main__":
    main()
