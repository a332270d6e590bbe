"""Where an op's time goes on a GPU: host overhead versus kernel time, per backend.

    python benchmarks/profile_ops.py [--quick]

For each case and backend it prints three numbers per call: `eager` (what a training step pays:
launches, Python and dispatch included), `graph` (the same work replayed from a CUDA graph: kernel
time plus launch gaps, no host code) and `kernels` (the sum of the CUDA kernel times the profiler
saw), followed by the profiler's kernel list. eager >> graph means the op is host-bound at this size.
On a CPU machine only `eager` is measured (the script then only proves it runs).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from cases import (FEATURE_CASES, QUICK_FEATURE_CASES, QUICK_RENOISE_CASES, RENOISE_CASES,  # noqa: E402
                   backends_for, capture_graph, feature_mse_case, renoise_case)


def eager_ms(fn, device, iters: int) -> float:
    for _ in range(3):
        fn()
    if device.type != "cuda":
        import time
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - t0) / iters * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def graph_ms(fn, iters: int) -> float | str:
    try:
        graph = capture_graph(fn)
    except Exception as exc:  # noqa: BLE001  (a path that cannot be captured says so in the table)
        torch.cuda.synchronize()
        return f"no capture ({type(exc).__name__}: {str(exc).splitlines()[0][:80] if str(exc) else ''})"
    return eager_ms(graph.replay, torch.device("cuda"), iters)


def kernel_profile(fn, iters: int) -> tuple[float, list[tuple[str, float, int]]]:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    rows = []
    for ev in prof.key_averages():
        dev_us = getattr(ev, "self_device_time_total", None) or getattr(ev, "self_cuda_time_total", 0)
        if ev.device_type.name == "CUDA" and dev_us > 0:  # kernels and memcpys/memsets, not host ops
            rows.append((ev.key[:70], dev_us / iters / 1e3, ev.count // iters))
    rows = sorted({r[0]: r for r in rows}.values(), key=lambda r: -r[1])
    return sum(r[1] for r in rows), rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="tiny shapes: proves the script, measures nothing")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--host-profile", action="store_true",
                    help="also print cProfile's top host functions for each fused backend's first feature case")
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    iters = 3 if args.quick else args.iters
    fcases = QUICK_FEATURE_CASES if args.quick else FEATURE_CASES
    rcases = QUICK_RENOISE_CASES if args.quick else RENOISE_CASES
    cases = []
    for dname, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        for case, shapes in fcases.items():
            for be in backends_for(device):
                for consume in (False, True) if be != "reference" else (False,):
                    fn, _ = feature_mse_case(shapes, dtype, device, be, consume)
                    cases.append((f"feature_mse{' consume' if consume else ''} {dname} {case}", be, fn))
        for case, shape in rcases.items():
            for be in backends_for(device):
                fn, _ = renoise_case(shape, dtype, device, be)
                cases.append((f"renoise {dname} {case}", be, fn))
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}")
    print("| case | backend | eager ms | graph ms | kernels ms | kernels (ms/call, launches/call) |\n|---|---|---|---|---|---|")
    for name, be, fn in cases:
        eager = eager_ms(fn, device, iters)
        if device.type == "cuda":
            graph = graph_ms(fn, iters)
            kern, rows = kernel_profile(fn, min(iters, 10))
            detail = "; ".join(f"{k} {ms:.3f} x{n}" for k, ms, n in rows[:6])
            graph_s = graph if isinstance(graph, str) else f"{graph:.3f}"
            print(f"| {name} | {be} | {eager:.3f} | {graph_s} | {kern:.3f} | {detail} |")
        else:
            print(f"| {name} | {be} | {eager:.3f} | - | - | - |")
    if args.host_profile:
        host_profile(cases, iters)


def host_profile(cases, iters: int) -> None:
    import cProfile
    import pstats
    seen = set()
    for name, be, fn in cases:
        if be == "reference" or be in seen or not name.startswith("feature_mse"):
            continue
        seen.add(be)
        print(f"\nhost profile: {name}, backend {be}, {iters} calls")
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(iters):
            fn()
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(22)


if __name__ == "__main__":
    main()
