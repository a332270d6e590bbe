"""The main job (`make demo` = `fastperc demo --out runs/demo`): the paper's two-stage recipe at small
scale on the embedded MNIST-5k, sampled and measured.

Training, for a conditional model (10% label dropout, for CFG) and for an unconditional one:
  1. `mse/` (`uncond_mse/`): plain MSE;
  2. `sp/` (`uncond_sp/`): a copy fine-tuned with the self-perceptual objective in the best
     configuration the search found (SP_BEST: four taps down to full resolution, RMS-normalised
     channels, t' in [0, 100]; for the unconditional model SP_BEST_UNCOND: the three of them before
     the midblock), the frozen stage-1 model (raw weights, not EMA) as teacher;
  3. `sp_paper/` (and `uncond_sp_paper/` in the longer presets): the same fine-tune in the paper's
     configuration (midblock tap, t' uniform);
  4. `mse_cont/` (`uncond_mse_cont/`): stage 1 continued with MSE for as many steps (equal data).
The fine-tunes run at the preset's `finetune_lr`. Then `classifier/` (the metrics' feature network),
samples (DDIM with trailing spacing; Euler steps for `--schedule flow`): samples_<row>.npz with PNG grids, a second sampling seed and a CFG
sweep under `extra/`, and `report.md` with the table, `grids.png` (side by side) and `fd_vs_cfg.png`.
Every stage resumes from its checkpoint or output when re-run (`--fresh` starts over).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from . import metrics, report
from .checkpoint import load as load_checkpoint
from .sample import generate, save_samples
from .config import TrainConfig
from .models import load_model, schedule_of
from .train import train
from ..adapters import mid_depth_block
from ..errors import InputError

# The search's best self-perceptual configuration (docs/RESULTS.md, "The search"): it beats the
# equal-step MSE continuation over three training seeds; the paper's (midblock, t' uniform) does not.
SP_BEST = dict(layers=("conv_in", "down_blocks.0", "down_blocks.1", "mid_block"), feature_norm="channel_rms",
               t_prime_range=(0, 100))
SP_BEST_NAME = "4 taps, channel RMS, t' in [0, 100]"
# For the unconditional model, the three taps before the midblock (batch L): over three seeds a lower FD than
# the four taps and the MSE continuation, and the best class balance; the midblock tap drives the bolder
# strokes and the shift towards 8s. The conditional model keeps the four taps (batch K: the three are
# cheaper but 0.04-0.11 worse on every seed).
SP_BEST_UNCOND = dict(SP_BEST, layers=SP_BEST["layers"][:3])
SP_BEST_UNCOND_NAME = "3 taps before the midblock, channel RMS, t' in [0, 100]"
SP_PAPER_NAME = "the paper's: midblock, t' uniform"
# For the DiT (`--arch dit`), the transformer search's best (docs/RESULTS.md, batch J): the mid-depth block
# (FrozenTeacher's default for transformers), raw features, t' logit-normal over the whole table; the
# UNet's winner does not carry over. The layers are filled in for the preset's depth.
DIT_BEST = dict(feature_norm="none", t_prime_density="logit_normal")
DIT_BEST_NAME = "mid-depth block, t' logit-normal"
DIT_PAPER_NAME = "mid-depth block, t' uniform"
# The DiT's training, from the testbed search (docs/RESULTS.md, "Towards a fair transformer testbed"): at the
# UNet's learning rates and uniform t its MSE model is 5x worse at equal steps; twice the learning rates,
# logit-normal t (as SD3 trains) and 1150/900 the steps (the UNet's wall time on CPU) bring it within 1.2x.
DIT_TRAINING = dict(lr_factor=2.0, steps_factor=1150 / 900, t_density="logit_normal")


@dataclass(frozen=True)
class Preset:
    """One size of the demo: the model, both training stages, sampling and the metrics' classifier."""
    block_channels: tuple[int, ...]
    batch_size: int
    lr: float
    mse_steps: int                  # stage 1, conditional model
    uncond_mse_steps: int           # stage 1, unconditional model
    finetune_steps: int             # stage 2 (and the MSE continuation), at finetune_lr
    finetune_lr: float
    sample_steps: int
    n: int                          # images of the first sampling seed
    n_extra: int                    # images of the second one and of the CFG sweep
    cfg_sweep: tuple[float, ...]
    classifier_epochs: int
    ema_decay: float
    paper_rows: tuple[str, ...] = ("",)  # model kinds ("" conditional, "uncond_") that also get the paper's row
    dit_width: int = 128
    dit_depth: int = 6
    training_seeds: tuple[int, ...] = ()  # several: the whole job per seed, then the spread over them


@dataclass(frozen=True)
class Plan(Preset):
    """A preset with the model and the two self-perceptual configurations of one architecture."""
    model: dict = field(default_factory=dict)       # the architecture's TrainConfig options (model, noise, t)
    sp_best: dict = field(default_factory=dict)     # the fine-tune options of the best configuration
    sp_best_uncond: dict = field(default_factory=dict)  # ... for the unconditional model
    sp_paper: dict = field(default_factory=dict)    # ... and of the paper's
    best_name: str = SP_BEST_NAME
    best_uncond_name: str = SP_BEST_UNCOND_NAME
    paper_name: str = SP_PAPER_NAME
    model_name: str = ""


# "default" fits in 30 minutes on 2 CPU cores (about 17 measured); "quick" is a smoke test; "long"/"gpu" train longer.
PRESETS = {
    "default": Preset(block_channels=(16, 32, 64), batch_size=64, lr=5e-4, mse_steps=900, uncond_mse_steps=700,
                      finetune_steps=300, finetune_lr=5e-5, sample_steps=15, n=1000, n_extra=500, cfg_sweep=(1.5,),
                      classifier_epochs=12, ema_decay=0.999),
    "quick": Preset(block_channels=(8, 16), dit_width=16, dit_depth=2, batch_size=8, lr=5e-4, mse_steps=4,
                    uncond_mse_steps=4, finetune_steps=2, finetune_lr=5e-4, sample_steps=3, n=20, n_extra=20,
                    cfg_sweep=(2.0,), classifier_epochs=1, ema_decay=0.9),
    "long": Preset(block_channels=(32, 64, 128), batch_size=64, lr=3e-4, mse_steps=8000, uncond_mse_steps=8000,
                   finetune_steps=4000, finetune_lr=5e-5, paper_rows=("", "uncond_"), sample_steps=50, n=1000,
                   n_extra=1000, cfg_sweep=(1.5, 2.0, 5.0, 7.5), classifier_epochs=15, ema_decay=0.999),
    "gpu": Preset(block_channels=(64, 128, 256), batch_size=128, lr=2e-4, mse_steps=20000, uncond_mse_steps=20000,
                  finetune_steps=10000, finetune_lr=5e-5, paper_rows=("", "uncond_"), sample_steps=50, n=1000,
                  n_extra=1000, cfg_sweep=(1.5, 2.0, 5.0, 7.5), classifier_epochs=15, ema_decay=0.9995),
}
PRESETS["full"] = replace(PRESETS["long"], training_seeds=(0, 1, 2))  # hours: the whole job per training seed
CFG_SCALE = 3.0


def arch_setup(p: Preset, arch: str, schedule: str) -> Plan:
    """The preset with the model and the two self-perceptual configurations for `arch` filled in."""
    if arch not in ("unet", "dit"):
        raise InputError(f"arch: expected 'unet' or 'dit', got {arch!r}")
    if schedule not in ("ddpm", "flow"):
        raise InputError(f"schedule: expected 'ddpm' or 'flow', got {schedule!r}")
    preset = {f.name: getattr(p, f.name) for f in fields(Preset)}
    model = dict(arch=arch, schedule=schedule, prediction_type="flow_prediction" if schedule == "flow" else "v_prediction")
    if arch == "unet":
        return Plan(**preset, model=dict(model, block_channels=p.block_channels), sp_best=SP_BEST,
                    sp_best_uncond=SP_BEST_UNCOND, sp_paper=dict(layers=("mid_block",)),
                    model_name=f"UNet {tuple(p.block_channels)}")
    mid_depth = (mid_depth_block([f"blocks.{i}" for i in range(p.dit_depth)]),)
    lr, steps = DIT_TRAINING["lr_factor"], DIT_TRAINING["steps_factor"]
    preset.update(lr=p.lr * lr, finetune_lr=p.finetune_lr * lr, mse_steps=round(p.mse_steps * steps),
                  uncond_mse_steps=round(p.uncond_mse_steps * steps))
    model = dict(model, dit_width=p.dit_width, dit_depth=p.dit_depth, t_density=DIT_TRAINING["t_density"])
    best = dict(DIT_BEST, layers=mid_depth)  # the DiT's unconditional model has not been searched: the same
    return Plan(**preset, model=model, sp_best=best, sp_best_uncond=best, sp_paper=dict(layers=mid_depth),
                best_name=DIT_BEST_NAME, best_uncond_name=DIT_BEST_NAME,
                paper_name=DIT_PAPER_NAME, model_name=f"DiT (width {p.dit_width}, depth {p.dit_depth})")


def rows_of(p: Plan) -> list[tuple[str, str]]:
    """(sample set, table title) of every row the preset reports, in table order."""
    best, paper = p.best_name, p.paper_name
    rows = [("mse", "conditional: MSE, no guidance"), ("mse_cfg", f"conditional: MSE + CFG {CFG_SCALE:g}"),
            ("sp", f"conditional: self-perceptual ({best}), no guidance"),
            ("sp_paper", f"conditional: self-perceptual ({paper}), no guidance"),
            ("uncond_mse", "unconditional: MSE"),
            ("uncond_sp", f"unconditional: self-perceptual ({p.best_uncond_name})"),
            ("uncond_sp_paper", f"unconditional: self-perceptual ({paper})")]
    return [(k, t) for k, t in rows if not k.endswith("sp_paper") or k[:-len("sp_paper")] in p.paper_rows]


def _source_of(row: str) -> tuple[str, float]:
    """(run folder, CFG scale) a row samples: the MSE rows sample the equal-step continuation."""
    if row == "mse_cfg":
        return "mse_cont", CFG_SCALE
    return (f"{row}_cont" if row.endswith("mse") else row), 1.0


def _train_pair(root: Path, prefix: str, base: TrainConfig, p: Plan, mse_steps: int) -> tuple[dict, int]:
    """Stage 1 (MSE), then the self-perceptual fine-tunes and the MSE continuation from it. Returns the
    wall time per stage and the signal that interrupted a stage (0 when none did)."""
    first = replace(base, out=str(root / f"{prefix}mse"), max_steps=mse_steps, save_every=max(1, mse_steps // 4))
    fine = dict(init=first.out, max_steps=p.finetune_steps, save_every=max(1, p.finetune_steps // 2),
                warmup_steps=1, lr=p.finetune_lr, seed=base.seed + 1)
    sp = dict(objective="self_perceptual", teacher=first.out, **fine)
    best = p.sp_best if base.conditional else p.sp_best_uncond
    stages = {f"{prefix}mse": first, f"{prefix}sp": replace(base, out=str(root / f"{prefix}sp"), **sp, **best)}
    if prefix in p.paper_rows:
        stages[f"{prefix}sp_paper"] = replace(base, out=str(root / f"{prefix}sp_paper"), **sp, **p.sp_paper)
    stages[f"{prefix}mse_cont"] = replace(base, out=str(root / f"{prefix}mse_cont"), **fine)
    times = {}
    for name, cfg in stages.items():
        t0 = time.time()
        result = train(cfg)
        if result["interrupted"]:  # the stage saved its checkpoint; a re-run resumes it
            return times, result["interrupted"]
        times[name] = round(time.time() - t0, 1)
        if result["steps_run"] == 0:
            print(f"stage {name}: already trained ({result['step']} steps in {cfg.out})")
        else:
            print(f"stage {name}: {result['step']} steps, last loss {result['loss']:.4f}, {times[name]} s")
    return times, 0


def run(out: str = "runs/demo", preset: str = "default", seed: int = 0, progress: bool = True,
        resume: bool = True, arch: str = "unet", schedule: str = "ddpm") -> dict:
    """The two-stage recipe; `arch` "unet" or "dit" (fastperc's small DiT) and `schedule` "ddpm" or
    "flow" (rectified flow, Euler sampling) choose the model and the noise process."""
    if preset not in PRESETS:
        raise InputError(f"preset: expected one of {list(PRESETS)}, got {preset!r}")
    p = arch_setup(PRESETS[preset], arch, schedule)
    if p.training_seeds:
        return _run_training_seeds(out, preset, p, progress, resume)
    return _run_one(out, preset, p, seed, progress, resume)


def _run_training_seeds(out: str, preset: str, p: Plan, progress: bool, resume: bool) -> dict:
    """The whole job once per training seed (in OUT/seed<k>/), then the spread across those seeds."""
    one = replace(p, training_seeds=())
    results = {}
    for s in p.training_seeds:
        r = _run_one(str(Path(out) / f"seed{s}"), preset, one, s, progress, resume)
        if r.get("interrupted"):
            return r
        results[s] = r
    rows = []
    for key, title in rows_of(p):
        per_seed = [{m: v[0] for m, v in results[s]["summary"][key].items() if isinstance(v, tuple)} | {"n": 0}
                    for s in results]
        agg = report.summarize(per_seed)
        agg["n"] = [len(results)]
        rows.append((title, agg))
    text = (f"# fastperc demo report, preset `{preset}`: spread over training seeds {list(results)}\n\n"
            "Each cell: mean ± half-range over the training seeds of each seed's mean over its 2 sampling seeds "
            "(per-seed reports in seed<k>/report.md). The 'seeds x images' column counts training seeds.\n\n"
            + report.table(rows) + "\n")
    Path(out, "report.md").write_text(text)
    print(f"done: report over {len(results)} training seeds in {out}/report.md")
    return {"summary": dict(zip((k for k, _ in rows_of(p)), (r for _, r in rows))), "per_seed": results}


def _run_one(out: str, preset: str, p: Plan, seed: int, progress: bool, resume: bool) -> dict:
    root = Path(out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = TrainConfig(out="", objective="mse", conditional=True, **p.model,
                       batch_size=p.batch_size, lr=p.lr, warmup_steps=min(100, p.mse_steps // 10 + 1),
                       ema_decay=p.ema_decay, seed=seed, log_every=max(1, min(20, p.mse_steps // 4)),
                       resume=resume, overwrite=not resume, progress=progress)
    t_start = time.time()
    times = {}
    for prefix, pair_base, steps in (("", base, p.mse_steps),
                                     ("uncond_", replace(base, conditional=False), p.uncond_mse_steps)):
        more, interrupted = _train_pair(root, prefix, pair_base, p, steps)
        if interrupted:
            return {"interrupted": interrupted}
        times |= more

    clf_path = root / "classifier" / "classifier.pt"
    t0 = time.time()
    if not (resume and clf_path.exists()):
        acc = metrics.train_classifier(str(root / "classifier"), epochs=p.classifier_epochs, seed=seed,
                                       progress=progress)["accuracy"]
    else:
        acc = load_checkpoint(clf_path)["held_out_accuracy"]
    times["classifier"] = round(time.time() - t0, 1)
    print(f"classifier: held-out accuracy {acc:.4f}")
    classifier = metrics.load_classifier(str(clf_path))
    reference = metrics.reference_of(classifier, metrics.reference_set().images)

    def sample_and_eval(path: Path, ckpt: str, scale: float, sample_seed: int, n: int) -> dict:
        if not (resume and path.exists()):
            t0 = time.time()
            model, model_config = load_model(str(root / ckpt), use_ema=True)
            imgs, labels = generate(model, model_config, n, steps=p.sample_steps, cfg_scale=scale, seed=sample_seed,
                                    device=device)
            save_samples(imgs, labels, path)
            times[str(path.relative_to(root))] = round(time.time() - t0, 1)
            print(f"{path.relative_to(root)}: {n} images ({p.sample_steps} {schedule_of(model_config).sampler} steps, CFG {scale})")
        imgs, labels = metrics.load_samples(str(path))
        return metrics.evaluate(imgs, labels, classifier, reference)

    sets = {name: _source_of(name) for name, _ in rows_of(p)}
    results: dict[str, list[dict]] = {}
    for name, (ckpt, scale) in sets.items():
        results[name] = [sample_and_eval(root / f"samples_{name}.npz", ckpt, scale, seed, p.n),
                         sample_and_eval(root / "extra" / f"samples_{name}_seed{seed + 1}.npz", ckpt, scale,
                                         seed + 1, p.n_extra)]
    sweep = {CFG_SCALE: results["mse_cfg"], 1.0: results["mse"]}
    for scale in p.cfg_sweep:
        sweep[scale] = [sample_and_eval(root / "extra" / f"samples_mse_cfg{scale:g}_seed{s}.npz", "mse_cont", scale,
                                        s, p.n_extra) for s in (seed, seed + 1)]
    summary = {k: report.summarize(v) for k, v in results.items()}
    sweep_summary = {s: report.summarize(v) for s, v in sorted(sweep.items())}
    best = min(sweep_summary, key=lambda s: sweep_summary[s]["fd"][0])
    times["total"] = round(time.time() - t_start, 1)
    _write_report(root, p, preset, seed, acc, summary, sweep_summary, best, times)
    (root / "summary.json").write_text(json.dumps(
        {"preset": preset, "seed": seed, "classifier_accuracy": acc, "seconds": times,
         "metrics": {k: {m: v for m, v in s.items()} for k, s in summary.items()},
         "cfg_sweep": {str(k): v for k, v in sweep_summary.items()}}, indent=2))
    print(f"done in {times['total']:.0f} s: samples, grids and report.md in {root}/")
    return {"summary": summary, "best_cfg": best, "seconds": times}


def _write_report(root, p, preset, seed, acc, summary, sweep, best, times) -> None:
    rows = [(title, summary[key]) for key, title in rows_of(p)]
    rows.insert(2, (f"conditional: MSE + CFG {best:g} (best FD of the sweep)", sweep[best]))
    panels = {"mse": "MSE", "mse_cfg": f"MSE + CFG {CFG_SCALE:g}", "sp": "self-perceptual (best)",
              "sp_paper": "self-perceptual (paper)", "uncond_mse": "uncond. MSE",
              "uncond_sp": "uncond. self-perceptual (best)", "uncond_sp_paper": "uncond. self-perceptual (paper)"}
    report.side_by_side([(panels[k], root / f"samples_{k}.png") for k, _ in rows_of(p)], root / "grids.png")
    scales = sorted(sweep)
    report.fd_vs_cfg_plot(scales, [sweep[s]["fd"] for s in scales], summary["sp"]["fd"], root / "fd_vs_cfg.png")

    def versus(sp: str, mse: str) -> str:
        a, b = summary[sp]["fd"][0], summary[mse]["fd"][0]
        pa, pb = summary[sp]["precision"][0], summary[mse]["precision"][0]
        return (f"{a:.3f} vs {b:.3f} ({'lower' if a < b else 'not lower'}; precision {pa:.3f} vs {pb:.3f})")

    best_name, paper_name = p.best_name, p.paper_name
    lines = [f"- conditional, {best_name}: {versus('sp', 'mse')}"]
    lines += [f"- conditional, {paper_name}: {versus('sp_paper', 'mse')}"] if "sp_paper" in summary else []
    lines += [f"- unconditional, {p.best_uncond_name}: {versus('uncond_sp', 'uncond_mse')}"]
    lines += ([f"- unconditional, {paper_name}: {versus('uncond_sp_paper', 'uncond_mse')}"]
              if "uncond_sp_paper" in summary else [])
    best_taps = ", ".join(p.sp_best["layers"])
    uncond_taps = "" if p.sp_best_uncond == p.sp_best else (
        f"; unconditional: {p.best_uncond_name}, taps {', '.join(p.sp_best_uncond['layers'])}")
    sampler = "Euler flow steps" if p.model["schedule"] == "flow" else "DDIM steps\n(trailing)"
    text = f"""# fastperc demo report

Preset `{preset}`, seed {seed}: {p.model_name}, {p.model['schedule']} schedule, t {p.model.get('t_density', 'uniform')}, batch {p.batch_size}, MSE stage
{p.mse_steps} steps at lr {p.lr:g} (unconditional: {p.uncond_mse_steps}), then
{p.finetune_steps} fine-tune steps at lr {p.finetune_lr:g} from it: the self-perceptual
objective ({best_name}: taps {best_taps}{uncond_taps}; and {paper_name}) and, on another copy, as many MSE
steps (the equal-data baseline the MSE rows sample); EMA weights; {p.sample_steps} {sampler}. Metrics on the held-out 500 real images with the classifier trained here (held-out
accuracy {acc:.4f}); FD-MNIST is a Frechet distance on that classifier's features, not FID. Mean ±
half-range over 2 sampling seeds ({p.n} and {p.n_extra} images) of one training seed.

{report.table(rows)}

Self-perceptual vs the MSE continuation without guidance, FD-MNIST (lower is better):

{chr(10).join(lines)}

One training seed: a difference smaller than the spread over training seeds (about 0.1 FD-MNIST
here) is not a result. `fastperc study` repeats such a comparison over several training seeds.

CFG sweep on the MSE model (FD-MNIST): {', '.join(f"{s:g}: {sweep[s]['fd'][0]:.3f}" for s in scales)}.

![samples](grids.png)

![FD vs CFG](fd_vs_cfg.png)

Wall time of this invocation (s; stages found finished are not re-run): {json.dumps(times)}
"""
    (root / "report.md").write_text(text)
