"""A study's FD-MNIST against each variant's training-step cost: the quality-per-compute front.

    python benchmarks/quality_per_compute.py docs/studies/k_cheaper.toml --study runs/study_k \
        [--steps 30] [--warmup 3] [--rounds 3] [--cost time|flops] [--out DIR]

Each variant's step is one of step_cases.py's (mse, 4tap, 4tap-quarter, 4tap-half, 3tap, 4tap-bf16),
chosen from the options that change its work (the objective, the taps, the share of the batch, the
teacher's precision; not the t' range, the normalisation or an MSE mix); all are timed in this one run
on the study's model (the teacher's architecture) at the study's batch size, forward + loss + backward
as bench_step.py times them (median of --steps after --warmup untimed). The cases are timed in
--rounds rounds, one after the other within each round, so that a drift of the machine's speed hits
them alike; a variant's cost is the median over rounds of its median over MSE's in the same round, with
the range over rounds beside it. Run it on a quiet machine. `--cost flops` counts each case's FLOP floor
instead (step_cases.flop_floor: matmuls, convolutions and attention on the meta device; no timing, the
same on every machine), for a front that does not move with a noisy machine; a FLOP count does not see a
bf16 teacher's speed, so its row is then listed with its FD and left out of the front. A variant no
case times is listed and left out (all of them: an error). Guided rows (guidance_scale) cost their
twin's training step, and twice the model evaluations at sampling: they are marked, and the front is
drawn among the unguided rows. Writes OUT/front.md (variant, cost, FD mean ± standard deviation over
training seeds, precision, the study's verdict, and whether the variant is on the front: no other is
both cheaper and lower in FD) and OUT/fd_vs_step_cost.png; OUT defaults to the study folder.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_step import measure  # noqa: E402
from step_cases import FOUR_TAPS, OBJECTIVES, SHARES, TAPS, Setup, make_step, step_flops  # noqa: E402

from fastperc.recipes.config import TrainConfig  # noqa: E402
from fastperc.recipes.study import SAMPLING_OPTIONS, is_guided  # noqa: E402


def case_of(name: str, options: dict) -> str:
    """The step case of a variant's effective options (base and variant); a ValueError naming the
    variant when no case times its step."""
    cfg = TrainConfig(out="", **{k: v for k, v in options.items() if k not in SAMPLING_OPTIONS})
    if cfg.objective == "mse":
        return "mse"
    taps = next((case for case, t in TAPS.items() if t == tuple(cfg.layers or ())), None)
    if taps is None:
        raise ValueError(f"variant {name!r}: no step case for layers {list(cfg.layers or ())}; expected "
                         f"{list(FOUR_TAPS)} or the first three")
    share = {f: suffix for suffix, f in SHARES.items()} | {1.0: ""}
    precision = {"same": "", "bf16": "-bf16"}.get(cfg.teacher_precision)
    case = taps + share.get(cfg.sp_fraction, "?") + (precision if precision is not None else "?")
    if case not in OBJECTIVES:
        raise ValueError(f"variant {name!r}: no step case for sp_fraction {cfg.sp_fraction} with teacher_precision "
                         f"{cfg.teacher_precision!r} and {taps}; expected one of {', '.join(OBJECTIVES)}")
    return case


def flop_blind(case: str) -> str | None:
    """Why a FLOP count cannot price `case` against the others, or None when it can: a bf16 teacher does
    the fp32 teacher's FLOPs at another speed (faster on a GPU with bf16 tensor cores, several times slower
    on a CPU without bf16 units), so only a timing on the target device prices it. (An FP8 teacher's
    scaled matmuls are counted at half their FLOPs by step_flops: priced.)"""
    if case.endswith("-bf16"):
        return (f"step case {case}: the bf16 teacher does the fp32 teacher's FLOPs at the device's bf16 "
                "speed; a FLOP floor cannot price it (time it with --cost time on the target device)")
    return None


def fd_cell(row: dict) -> str:
    """A row's FD-MNIST: mean ± standard deviation over training seeds, or the seed's value when one."""
    seeds = row["training_seeds"]
    if len(seeds) == 1:
        return f"{row['fd'][0]:.3f} (training seed {seeds[0]} only)"
    return f"{row['fd'][0]:.3f} ± {row['fd'][1]:.3f}"


def study_setup(teacher: str, batch: int, device: torch.device) -> Setup:
    """The teacher's model (its architecture, fresh weights: the cost does not depend on them) and a
    batch of its inputs."""
    from fastperc.recipes import checkpoint
    from fastperc.recipes.models import build_model

    config = checkpoint.load(teacher)["model_config"]
    torch.manual_seed(0)
    student = build_model(config).to(device)
    x0 = torch.rand(batch, config.get("in_channels", 1), config["image_size"], config["image_size"],
                    device=device) * 2 - 1
    classes = config.get("num_classes")
    kwargs = {"class_labels": torch.randint(0, classes, (batch,), device=device)} if classes else {}
    return Setup(student, x0, kwargs, f"the study's model ({teacher}), batch {batch}")


def front(points: list[tuple[str, float, float]]) -> set[str]:
    """Names of the (name, cost, fd) points that no other point beats on both (cheaper or as cheap, and
    lower FD)."""
    return {n for n, c, f in points
            if not any((c2 <= c and f2 < f) or (c2 < c and f2 <= f) for n2, c2, f2 in points if n2 != n)}


def cost_over_rounds(rounds: list[dict[str, float]]) -> dict[str, tuple[float, float, float]]:
    """Per case: (median, lowest, highest) over rounds of its time over MSE's time in the same round."""
    if not rounds or any("mse" not in r or r["mse"] <= 0 for r in rounds):
        raise ValueError(f"rounds: expected each round to cost 'mse' more than 0, got {rounds}")
    ratios = {case: sorted(r[case] / r["mse"] for r in rounds) for case in rounds[0]}
    return {case: (statistics.median(v), v[0], v[-1]) for case, v in ratios.items()}


def time_cases(args, teacher: str, batch: int, device: torch.device, names: list[str]) -> tuple[dict, str]:
    """Each case's cost over rounds of timing (cost_over_rounds) and a line that says how it was measured."""
    setup = study_setup(teacher, batch, device)
    steps = {case: make_step(case, setup, None) for case in names}
    rounds = []
    for k in range(args.rounds):
        rounds.append({case: measure(step, device, args.steps, args.warmup)["ms"] for case, step in steps.items()})
        print(f"round {k + 1}: " + ", ".join(f"{c} {t:.1f} ms" for c, t in rounds[-1].items()), flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    how = (f"{name}, torch {torch.__version__}; {args.rounds} rounds, each timing every case (median of {args.steps} "
           f"steps); the cost is the median over rounds of the case's time over MSE's in the same round, its range "
           f"over rounds in brackets; MSE {statistics.median(r['mse'] for r in rounds):.1f} ms")
    return cost_over_rounds(rounds), how


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("spec", help="the study's spec (TOML)")
    ap.add_argument("--study", required=True, help="the study's output folder (its results.jsonl)")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=3, help="rounds over all cases (the cost: median over rounds)")
    ap.add_argument("--cost", choices=("time", "flops"), default="time",
                    help="time the steps (default) or count their FLOP floor on the meta device")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.rounds < 1:
        ap.error(f"--rounds: expected 1 or more, got {args.rounds}")
    from fastperc.recipes.study import aggregate, load_spec, read_results

    spec = load_spec(args.spec, out=args.study)
    results = read_results(Path(args.study) / "results.jsonl")
    if not results:
        ap.error(f"--study: expected {args.study}/results.jsonl with the study's rows; found none")
    rows, cases, skipped = [], {}, []
    for r in aggregate(spec, list(results.values())):
        try:
            case = case_of(r["variant"], r["effective"])
        except ValueError as e:
            skipped.append(str(e))
            continue
        blind = flop_blind(case) if args.cost == "flops" else None
        if blind:
            skipped.append(f"variant {r['variant']!r} (FD-MNIST {fd_cell(r)}): {blind}")
            continue
        cases[r["variant"]] = case
        rows.append(r)
    for reason in skipped:
        print(f"left out: {reason}")
    if not rows:
        ap.error(f"--study: every row of {args.study}/results.jsonl was left out, nothing to price: "
                 + "; ".join(skipped))
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = TrainConfig(out="", **spec._train_options({})).batch_size
    names = list(dict.fromkeys(["mse", *cases.values()]))  # each step case once, MSE first
    if args.cost == "flops":
        setup = study_setup(spec.teacher, batch, torch.device("meta"))
        flops = {case: step_flops(case, setup) for case in names}
        print(", ".join(f"{c} {f / 1e9:.1f} GFLOP" for c, f in flops.items()), flush=True)
        costs = cost_over_rounds([flops])
        how = f"FLOP floor per step (MSE {flops['mse'] / 1e9:.1f} GFLOP; no timing)"
    else:
        costs, how = time_cases(args, spec.teacher, batch, device, names)
    points = [(r["variant"], costs[cases[r["variant"]]][0], r["fd"][0]) for r in rows]
    guided = {r["variant"] for r in rows if is_guided(r["effective"])}
    best = front([p for p in points if p[0] not in guided])
    out = Path(args.out or args.study)
    out.mkdir(parents=True, exist_ok=True)
    lines = [f"Step cost: the study's model ({spec.teacher}), batch {batch}; {how}. "
             f"FD-MNIST: mean ± standard deviation over training seeds {spec.training_seeds}.\n",
             "| variant | step case | cost (x MSE) | FD-MNIST ↓ | precision ↑ | vs MSE | on the front |",
             "|---|---|---|---|---|---|---|"]
    for (name, cost, fd), r in zip(points, rows):
        mark = "guided: 2x sampling" if name in guided else "yes" if name in best else ""
        lo, hi = costs[cases[name]][1:]
        spread = f" ({lo:.2f}-{hi:.2f})" if f"{lo:.2f}" != f"{hi:.2f}" else ""
        lines.append(f"| {name} | {cases[name]} | {cost:.2f}{spread} | {fd_cell(r)} | "
                     f"{r['precision'][0]:.3f} | {r['verdict']} | {mark} |")
    lines += [f"\nLeft out: {s}" for s in skipped]
    (out / "front.md").write_text("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    for (name, cost, fd), r in zip(points, rows):
        ax.errorbar(cost, fd, yerr=r["fd"][1], fmt="s" if name in guided else "o", capsize=3,
                    color="C3" if name in best else "C0" if name in guided else "C7")
        ax.annotate(name, (cost, fd), fontsize=6, xytext=(4, 2), textcoords="offset points")
    ax.margins(x=0.3)  # room for the labels of the right-most points
    ax.set_xlabel("training step cost (x MSE step, step benchmark)")
    ax.set_ylabel("FD-MNIST (lower is better)")
    fig.tight_layout()
    fig.savefig(out / "fd_vs_step_cost.png")
    print(f"front: {out / 'front.md'}, {out / 'fd_vs_step_cost.png'}")


if __name__ == "__main__":
    main()
