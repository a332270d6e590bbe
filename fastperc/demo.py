"""The main job (`make demo` = `fastperc demo --out runs/demo`): the paper's two-stage recipe at small
scale, on the embedded MNIST-5k, then samples from each model.

1. `mse/`: a conditional UNet trained with plain MSE (10% label dropout, for CFG at sampling).
2. `sp/`: a copy fine-tuned with the self-perceptual objective; the frozen stage-1 model is the teacher.
3. `mse_cont/`: the stage-1 run continued with MSE for the same number of steps (equal compute).
4. samples_mse.npz (mse_cont, no guidance), samples_mse_cfg.npz (mse_cont, CFG 3), samples_sp.npz
   (sp, no guidance), with a PNG grid beside each.
"""
from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import torch

from .sample import generate, save_samples
from .train import TrainConfig, load_model, train

# Presets: "default" fits ~15 minutes on 2 CPU cores; "long" and "gpu" train longer and larger.
PRESETS = {
    "default": dict(block_channels=(16, 32, 64), batch_size=64, lr=5e-4, mse_steps=1200, finetune_steps=400,
                    sample_steps=20, n=1000, ema_decay=0.999),
    "quick": dict(block_channels=(8, 16), batch_size=8, lr=5e-4, mse_steps=4, finetune_steps=2, sample_steps=3,
                  n=20, ema_decay=0.9),
    "long": dict(block_channels=(32, 64, 128), batch_size=64, lr=3e-4, mse_steps=8000, finetune_steps=4000,
                 sample_steps=50, n=1000, ema_decay=0.999),
    "gpu": dict(block_channels=(64, 128, 256), batch_size=128, lr=2e-4, mse_steps=20000, finetune_steps=10000,
                sample_steps=50, n=1000, ema_decay=0.9995),
}
CFG_SCALE = 3.0


def run(out: str = "runs/demo", preset: str = "default", seed: int = 0, progress: bool = True,
        resume: bool = True) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"preset: expected one of {list(PRESETS)}, got {preset!r}")
    p = PRESETS[preset]
    root = Path(out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = TrainConfig(out=str(root / "mse"), objective="mse", conditional=True, block_channels=p["block_channels"],
                       batch_size=p["batch_size"], lr=p["lr"], warmup_steps=min(100, p["mse_steps"] // 10 + 1),
                       ema_decay=p["ema_decay"], seed=seed, max_steps=p["mse_steps"],
                       save_every=max(1, p["mse_steps"] // 4), log_every=max(1, min(20, p["mse_steps"] // 4)),
                       resume=resume, progress=progress)
    times = {}
    stages = [
        ("mse", base),
        ("sp", replace(base, out=str(root / "sp"), objective="self_perceptual", init=str(root / "mse"),
                       teacher=str(root / "mse"), max_steps=p["finetune_steps"],
                       save_every=max(1, p["finetune_steps"] // 2), warmup_steps=1, seed=seed + 1)),
        ("mse_cont", replace(base, out=str(root / "mse_cont"), init=str(root / "mse"), max_steps=p["finetune_steps"],
                             save_every=max(1, p["finetune_steps"] // 2), warmup_steps=1, seed=seed + 1)),
    ]
    for name, cfg in stages:
        t0 = time.time()
        result = train(cfg)
        if result["interrupted"]:
            return {"interrupted": result["interrupted"], "stage": name}
        times[name] = round(time.time() - t0, 1)
        print(f"stage {name}: {result['step']} steps, last loss {result['loss']:.4f}, {times[name]} s")

    outputs = {}
    for name, ckpt, scale in (("samples_mse", "mse_cont", 1.0), ("samples_mse_cfg", "mse_cont", CFG_SCALE),
                              ("samples_sp", "sp", 1.0)):
        t0 = time.time()
        model, mconf = load_model(str(root / ckpt), use_ema=True)
        imgs, labels = generate(model, mconf, p["n"], steps=p["sample_steps"], cfg_scale=scale, seed=seed,
                                device=device)
        npz, png = save_samples(imgs, labels, root / f"{name}.npz")
        times[name] = round(time.time() - t0, 1)
        outputs[name] = {"npz": str(npz), "png": str(png)}
        print(f"{name}: {len(imgs)} images ({p['sample_steps']} DDIM steps, CFG {scale}) -> {npz}, {png}")
    summary = {"preset": preset, "seed": seed, "seconds": times, "outputs": outputs}
    (root / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"done: samples and grids in {root}/ (summary.json holds the stage times)")
    return summary
