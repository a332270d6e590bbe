"""`fastperc study SPEC.toml`: fine-tune variants of one MSE-trained model, each for the same number of
steps as a plain MSE continuation of it, sample, evaluate on the held-out split, and tabulate mean and
spread over training seeds and sampling seeds.

A spec is a small TOML file:

    [study]
    teacher = "runs/demo/mse"        # the MSE-trained checkpoint: every variant's start and teacher
    steps = 300                      # fine-tune steps of every variant (equal steps = equal data)
    training_seeds = [1, 2, 3]
    sampling_seeds = [0]
    samples = 1000                   # images per (run, sampling seed)
    sample_steps = 15                # sampler steps (DDIM, or Euler for flow matching)
    classifier = "runs/demo/classifier"   # optional: trained into OUT/classifier when absent
    base = { lr = 5e-5, batch_size = 64, conditional = true }   # any `fastperc train` option

    [[variant]]
    name = "self-perceptual, midblock"
    objective = "self_perceptual"

    [[variant]]
    name = "self-perceptual + 0.1 MSE"
    objective = "self_perceptual"
    mse_weight = 0.1

    [[variant]]
    name = "MSE continued + CFG 1.5"
    objective = "mse"
    guidance_scale = 1.5             # sampling only: classifier-free guidance (conditional models)

Option names are TrainConfig's (the `fastperc train` flags with underscores), plus the sampling option
`guidance_scale` (default 1, no guidance). Variants whose training options are equal share one
training run: a guided row costs only its sampling. A variant named "MSE continued" (the base options
with objective "mse", no guidance) is added when no variant is one: it is the baseline every row is
compared with. Everything resumes: finished runs, samples and metrics are found on disk and skipped.

Output: OUT/runs/<variant>/seed<k>/ (checkpoint, log, samples; variants that share a run share the
folder of their first unguided one), OUT/results.jsonl (one line per run and sampling seed), OUT/table.md, OUT/fd_by_variant.png and one OUT/fd_vs_<option>.png per
numeric option that the variants sweep, OUT/grids.png (sampling seed 0 of the first training seed).
"""
from __future__ import annotations

import json
import re
import time
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch

from . import checkpoint, metrics, report
from .sample import generate, save_samples
from .config import STUDY_OPTIONS, TrainConfig
from .models import load_model, schedule_of
from .train import train
from ..errors import InputError, MissingFileError

BASELINE = "MSE continued"
# Variant keys that change sampling, not training, with their defaults.
SAMPLING_DEFAULTS = {"guidance_scale": 1.0}
SAMPLING_OPTIONS = frozenset(SAMPLING_DEFAULTS)
METRICS = ("fd", "classifier_score", "precision", "recall", "class_tv", "ink_ratio", "label_accuracy")


@dataclass
class StudySpec:
    teacher: str
    out: str
    steps: int = 300
    training_seeds: list[int] = field(default_factory=lambda: [1, 2, 3])
    sampling_seeds: list[int] = field(default_factory=lambda: [0])
    samples: int = 1000
    sample_steps: int = 15
    classifier: str | None = None
    classifier_epochs: int = 12
    base: dict = field(default_factory=dict)
    variants: list[tuple[str, dict]] = field(default_factory=list)

    def validate(self) -> None:
        options = STUDY_OPTIONS | SAMPLING_OPTIONS
        for name, opts in [("base", self.base)] + [(f"variant {n!r}", o) for n, o in self.variants]:
            unknown = sorted(set(opts) - options)
            if unknown:
                raise InputError(f"{name}: unknown training options {unknown}; expected names among {sorted(options)}")
        names = [n for n, _ in self.variants]
        if len(set(names)) != len(names):
            raise InputError(f"variant: expected distinct names, got {names}")
        for key in ("steps", "samples", "sample_steps"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise InputError(f"{key}: expected a positive integer, got {getattr(self, key)!r}")
        if not self.training_seeds or not self.sampling_seeds:
            raise InputError("training_seeds/sampling_seeds: expected at least one seed each")
        for name, opts in self.variants:
            cfg = TrainConfig(out="", **self._train_options(opts))
            cfg.validate()
            scale = self.effective(opts)["guidance_scale"]
            if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0:
                raise InputError(f"variant {name!r}: guidance_scale: expected a number > 0, got {scale!r}")
            if scale != 1 and cfg.conditional is False:  # None: the teacher's; sampling refuses an unconditional one
                raise InputError(f"variant {name!r}: guidance_scale: classifier-free guidance needs "
                                 f"conditional = true, got conditional = {cfg.conditional!r}")

    def effective(self, variant: dict) -> dict:
        """`effective_options` of this spec's base and `variant`."""
        return effective_options(self.base, variant)

    def _train_options(self, variant: dict) -> dict:
        options = {"teacher": self.teacher, "init": self.teacher, **self.effective(variant)}
        return {k: v for k, v in options.items() if k not in SAMPLING_OPTIONS}

    def run_dirs(self) -> dict[str, Path]:
        """Each variant's training folder (per seed below it): variants with equal training options
        share one run, in the folder of the first of them that samples unguided (else the first)."""
        groups: list[tuple[TrainConfig, list[str]]] = []
        for name, opts in self.variants:
            cfg = TrainConfig(out="", **self._train_options(opts))  # equal with defaults filled in
            group = next((names for c, names in groups if c == cfg), None)
            if group is None:
                groups.append((cfg, [name]))
            else:
                group.append(name)
        opts = dict(self.variants)
        dirs = {}
        for _, names in groups:
            owner = next((n for n in names if not is_guided(self.effective(opts[n]))), names[0])
            dirs |= {n: Path(self.out) / "runs" / slug(owner) for n in names}
        return dirs


def effective_options(base: dict, variant: dict) -> dict:
    """A variant's options over the base's, with the sampling options' defaults filled in."""
    return {**SAMPLING_DEFAULTS, **base, **variant}


def is_guided(effective: dict) -> bool:
    return effective["guidance_scale"] != 1


def samples_name(sampling_seed: int, guidance_scale: float) -> str:
    """The sample file of one sampling seed (the guided ones say their scale)."""
    return f"samples_seed{sampling_seed}" + (f"_cfg{guidance_scale:g}" if guidance_scale != 1 else "")


def is_baseline(effective: dict) -> bool:
    """An unguided MSE continuation (TrainConfig's default objective is MSE)."""
    objective = effective.get("objective", TrainConfig.__dataclass_fields__["objective"].default)
    return objective == "mse" and not is_guided(effective)


def load_spec(path: str | Path, out: str | None = None) -> StudySpec:
    """Read a study spec (TOML); `out` overrides [study].out (default: the spec's folder / its name)."""
    path = Path(path)
    if not path.exists():
        raise MissingFileError(f"spec: {path} does not exist")
    try:
        doc = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"spec: {path} is not valid TOML ({e})") from e
    study = dict(doc.get("study", {}))
    if "teacher" not in study:
        raise InputError(f"spec: {path} has no [study] teacher = \"<MSE-trained checkpoint>\"")
    variants = []
    for i, v in enumerate(doc.get("variant", [])):
        v = dict(v)
        name = v.pop("name", None)
        if not isinstance(name, str) or not name:
            raise InputError(f"variant {i}: expected a name = \"...\"")
        variants.append((name, _tuples(v)))
    if not any(is_baseline(effective_options(study.get("base", {}), o)) for _, o in variants):
        variants.insert(0, (BASELINE, {"objective": "mse", "guidance_scale": 1.0}
                            if "guidance_scale" in study.get("base", {}) else {"objective": "mse"}))
    known = {f.name for f in fields(StudySpec)} - {"variants", "out"}
    unknown = sorted(set(study) - known - {"out"})
    if unknown:
        raise InputError(f"study: unknown keys {unknown}; expected {sorted(known | {'out'})}")
    spec = StudySpec(out=out or study.pop("out", None) or str(path.with_suffix("")),
                     **{k: v for k, v in study.items() if k != "out"}, variants=variants)
    spec.base = _tuples(spec.base)
    spec.validate()
    return spec


def _tuples(opts: dict) -> dict:
    """TOML arrays as the tuples TrainConfig holds."""
    return {k: tuple(v) if isinstance(v, list) else v for k, v in opts.items()}


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", name).strip("_") or "variant"


def run(spec: StudySpec, progress: bool = True) -> list[dict]:
    """Train, sample and evaluate every (variant, training seed); returns the aggregated rows."""
    out = Path(spec.out)
    out.mkdir(parents=True, exist_ok=True)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    clf_path = Path(spec.classifier) if spec.classifier else out / "classifier"
    if not (clf_path / "classifier.pt").exists() and not (clf_path.is_file()):
        print(f"study: training the metrics' classifier into {clf_path}")
        metrics.train_classifier(str(clf_path), epochs=spec.classifier_epochs, progress=progress)
    classifier = metrics.load_classifier(str(clf_path))
    reference = metrics.reference_of(classifier, metrics.reference_set().images)
    results_path = out / "results.jsonl"
    done = read_results(results_path)
    run_dirs = spec.run_dirs()
    for seed in spec.training_seeds:  # seed-major: one seed of every variant first, for an early first look
        for name, opts in spec.variants:
            run_dir = run_dirs[name] / f"seed{seed}"
            scale = spec.effective(opts)["guidance_scale"]
            cfg = TrainConfig(out=str(run_dir), seed=seed, max_steps=spec.steps, save_every=max(1, spec.steps // 2),
                              resume=True, progress=progress, **spec._train_options(opts))
            t0 = time.time()
            result = train(cfg)
            if result["interrupted"]:
                raise KeyboardInterrupt(result["interrupted"])
            train_s = round(time.time() - t0, 1) if result["steps_run"] else None
            for sseed in spec.sampling_seeds:
                key = (name, seed, sseed)
                if key in done:
                    continue
                npz = run_dir / f"{samples_name(sseed, scale)}.npz"
                if not npz.exists():
                    model, model_config = load_model(str(run_dir), use_ema=True)
                    imgs, labels = generate(model, model_config, spec.samples, steps=spec.sample_steps, seed=sseed,
                                            cfg_scale=scale, device=device)
                    save_samples(imgs, labels, npz)
                imgs, labels = metrics.load_samples(str(npz))
                m = metrics.evaluate(imgs, labels, classifier, reference)
                row = {"variant": name, "training_seed": seed, "sampling_seed": sseed, "train_seconds": train_s,
                       "steps": spec.steps, **{k: m[k] for k in METRICS if k in m}, "n": m["n"],
                       "class_shares": m["class_shares"]}
                with open(results_path, "a") as f:
                    f.write(json.dumps(row) + "\n")
                done[key] = row
                print(f"study: {name}, training seed {seed}, sampling seed {sseed}: FD-MNIST {row['fd']:.3f}")
    rows = aggregate(spec, list(done.values()))
    write_outputs(spec, rows, out, data_shares=[float(x) for x in reference.shares])
    return rows


def read_results(path: Path) -> dict:
    """The rows of a study's results.jsonl by (variant, training seed, sampling seed); {} when absent."""
    if not path.exists():
        return {}
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()]
    return {(r["variant"], r["training_seed"], r["sampling_seed"]): r for r in rows}


def aggregate(spec: StudySpec, results: list[dict]) -> list[dict]:
    """Per variant: each metric's mean and sample standard deviation over training seeds (each seed's
    value is its mean over sampling seeds), and the mean spread (half-range) over sampling seeds."""
    rows = []
    for name, opts in spec.variants:
        mine = [r for r in results if r["variant"] == name and r["training_seed"] in spec.training_seeds]
        if not mine:
            continue
        row = {"variant": name, "options": opts, "effective": spec.effective(opts), "training_seeds": sorted({r["training_seed"] for r in mine}),
               "sampling_seeds": sorted({r["sampling_seed"] for r in mine}), "n": mine[0]["n"]}
        shares = [r["class_shares"] for r in mine if r.get("class_shares")]
        if shares:  # the predicted-class histogram, averaged over every run and sampling seed
            row["class_shares"] = [float(x) for x in np.mean(shares, axis=0)]
        secs = [r["train_seconds"] for r in mine if r.get("train_seconds")]
        row["train_seconds"] = float(np.mean(secs)) if secs else None
        for k in METRICS:
            per_seed = []
            spreads = []
            for s in row["training_seeds"]:
                vals = [r[k] for r in mine if r["training_seed"] == s and k in r]
                if vals:
                    per_seed.append(float(np.mean(vals)))
                    spreads.append((max(vals) - min(vals)) / 2)
            if per_seed:
                row[k] = (float(np.mean(per_seed)), float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else 0.0,
                          float(np.mean(spreads)))
        rows.append(row)
    base = next((r for r in rows if is_baseline(r["effective"])), None)
    for r in rows:
        r["verdict"] = verdict(r, base) if base is not None and r is not base else "baseline" if r is base else "-"
    return rows


def verdict(row: dict, base: dict) -> str:
    """'beats' when FD is lower than the baseline's by more than the larger spread over training seeds,
    with precision not lower; 'worse' when higher by as much; else 'tie'. A spread needs at least three
    training seeds on both sides; with fewer there is no verdict."""
    (fd, sd, _), (bfd, bsd, _) = row["fd"], base["fd"]
    margin = max(sd, bsd)
    seeds = min(len(row["training_seeds"]), len(base["training_seeds"]))
    if seeds < 3:
        return f"{seeds} seed{'s' if seeds > 1 else ''}: no verdict"
    if fd < bfd - margin and row["precision"][0] >= base["precision"][0] - base["precision"][1]:
        return "beats"
    if fd > bfd + margin:
        return "worse"
    return "tie"


def table(spec: StudySpec, rows: list[dict]) -> str:
    head = ("| variant | options | seeds | FD-MNIST ↓ | precision ↑ | recall ↑ | classifier score ↑ | class TV ↓ "
            "| ink / real | label acc. ↑ | s / run | vs MSE |")
    lines = [head, "|" + "---|" * 12]
    for r in rows:
        def cell(k):
            if k not in r:
                return "-"
            m, sd, ss = r[k]
            return f"{m:.3f} ± {sd:.3f}" + (f" ({ss:.3f})" if len(r["sampling_seeds"]) > 1 else "")
        opts = ", ".join(f"{k}={v}" for k, v in r["options"].items()) or "base"
        secs = f"{r['train_seconds']:.0f}" if r["train_seconds"] else "-"
        lines.append(f"| {r['variant']} | {opts} | {len(r['training_seeds'])} x {len(r['sampling_seeds'])} | "
                     f"{cell('fd')} | {cell('precision')} | {cell('recall')} | {cell('classifier_score')} | "
                     f"{cell('class_tv')} | {cell('ink_ratio')} | {cell('label_accuracy')} | {secs} | {r['verdict']} |")
    return "\n".join(lines)


def swept_options(rows: list[dict]) -> dict[str, list[dict]]:
    """Numeric options (base or variant) that take two or more values across variants, with the rows
    that have them."""
    out = {}
    keys = {k for r in rows for k, v in r["effective"].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    for k in sorted(keys):
        having = [r for r in rows if k in r["effective"]]
        if len({r["effective"][k] for r in having}) >= 2:
            out[k] = having
    return out


def _sampler_of(teacher: str) -> str:
    """The sampler of the teacher's schedule (DDIM or Euler): the variants sample with it too."""
    return schedule_of(checkpoint.load(teacher)["model_config"]).sampler


def class_balance_table(rows: list[dict], data_shares: list[float] | None) -> str:
    """Markdown: each variant's share of samples per predicted class (mean over its runs), under the
    held-out digits' own shares when given."""
    having = [r for r in rows if r.get("class_shares")]
    classes = len(having[0]["class_shares"])
    lines = ["| samples of | " + " | ".join(str(c) for c in range(classes)) + " | class TV ↓ |",
             "|---|" + "---|" * (classes + 1)]
    if data_shares is not None:
        lines.append("| held-out digits | " + " | ".join(f"{x:.3f}" for x in data_shares) + " | 0 |")
    for r in having:
        tv = f"{r['class_tv'][0]:.3f}" if "class_tv" in r else "-"
        lines.append(f"| {r['variant']} | " + " | ".join(f"{x:.3f}" for x in r["class_shares"]) + f" | {tv} |")
    return "\n".join(lines)


def write_outputs(spec: StudySpec, rows: list[dict], out: Path, data_shares: list[float] | None = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    text = (f"# Study: {len(spec.variants)} variants of {spec.teacher}, {spec.steps} fine-tune steps each\n\n"
            f"Base options: {spec.base or 'defaults'}. Training seeds {spec.training_seeds}, sampling seeds "
            f"{spec.sampling_seeds}, {spec.samples} images per run and sampling seed, {spec.sample_steps} "
            f"{_sampler_of(spec.teacher)} steps, EMA weights. Each cell: mean ± standard deviation over training seeds (each seed averaged "
            "over its sampling seeds; the spread over sampling seeds in brackets when there are several). "
            "'vs MSE' (with three or more training seeds): 'beats' = FD lower than the MSE continuation's by more than the larger standard "
            "deviation, with precision not lower.\n\n" + table(spec, rows) + "\n")
    if any(r.get("class_shares") for r in rows):
        text += ("\nClass balance: the share of samples the classifier puts in each class (mean over runs), "
                 "against the held-out digits'.\n\n" + class_balance_table(rows, data_shares) + "\n")
    (out / "table.md").write_text(text)
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(rows) + 2), 3.4), dpi=120)
    ax.bar(range(len(rows)), [r["fd"][0] for r in rows], yerr=[r["fd"][1] for r in rows], capsize=3,
           color=["C0" if r["verdict"] == "baseline" else "C3" for r in rows])
    ax.set_xticks(range(len(rows)), [r["variant"] for r in rows], rotation=30, ha="right", fontsize=7)
    ax.set_ylabel("FD-MNIST (lower is better)")
    fig.tight_layout()
    fig.savefig(out / "fd_by_variant.png")
    plt.close(fig)
    for key, having in swept_options(rows).items():
        fig, ax = plt.subplots(figsize=(4.5, 3.2), dpi=120)
        xs = [r["effective"][key] for r in having]
        ax.errorbar(xs, [r["fd"][0] for r in having], yerr=[r["fd"][1] for r in having], fmt="o", capsize=3)
        for x, r in zip(xs, having):
            ax.annotate(r["variant"], (x, r["fd"][0]), fontsize=6)
        if all(x > 0 for x in xs) and max(xs) / min(xs) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(key)
        ax.set_ylabel("FD-MNIST")
        fig.tight_layout()
        fig.savefig(out / f"fd_vs_{key}.png")
        plt.close(fig)
    seed, sseed = spec.training_seeds[0], spec.sampling_seeds[0]
    run_dirs = spec.run_dirs()
    grids = [(r["variant"][:28], run_dirs[r["variant"]] / f"seed{seed}" /
              f"{samples_name(sseed, r['effective']['guidance_scale'])}.png") for r in rows]
    grids = [(t, p) for t, p in grids if p.exists()]
    if grids:
        report.side_by_side(grids, out / "grids.png")
    print(f"study: table in {out / 'table.md'}")
