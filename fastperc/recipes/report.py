"""The demo's report: one table like the paper's (mean and spread over sampling seeds), the sample
grids side by side, and FD-MNIST against the CFG scale with the self-perceptual point marked."""
from __future__ import annotations

from pathlib import Path

import numpy as np

COLUMNS = (("fd", "FD-MNIST ↓"), ("classifier_score", "classifier score ↑"), ("precision", "precision ↑"),
           ("recall", "recall ↑"), ("class_tv", "class TV ↓"), ("ink_ratio", "ink / real"),
           ("label_accuracy", "label accuracy ↑"))


def summarize(runs: list[dict]) -> dict:
    """Mean and half-range of each metric over sampling seeds."""
    out = {"seeds": len(runs), "n": [r["n"] for r in runs]}
    for key, _ in COLUMNS:
        vals = [r[key] for r in runs if key in r]
        if vals:
            out[key] = (float(np.mean(vals)), float((max(vals) - min(vals)) / 2))
    return out


def table(rows: list[tuple[str, dict]]) -> str:
    head = "| model | seeds x images | " + " | ".join(name for _, name in COLUMNS) + " |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 2)]
    for name, s in rows:
        cells = [f"{s[k][0]:.3f} ± {s[k][1]:.3f}" if k in s else "-" for k, _ in COLUMNS]
        lines.append(f"| {name} | {s['seeds']} x {'/'.join(str(n) for n in s['n'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def side_by_side(grids: list[tuple[str, Path]], path: Path) -> Path:
    """The PNG grids next to each other, each under its title."""
    from PIL import Image, ImageDraw

    ims = [Image.open(p).convert("L") for _, p in grids]
    w, h = sum(im.width for im in ims) + 10 * (len(ims) - 1), max(im.height for im in ims) + 16
    canvas = Image.new("L", (w, h), 255)
    draw = ImageDraw.Draw(canvas)
    x = 0
    for (title, _), im in zip(grids, ims):
        draw.text((x + 2, 2), title, fill=0)
        canvas.paste(im, (x, 16))
        x += im.width + 10
    canvas.save(path)
    return path


def fd_vs_cfg_plot(scales: list[float], fds: list[tuple[float, float]], sp_fd: tuple[float, float],
                   path: Path) -> Path:
    """FD-MNIST of the MSE model against the CFG scale (mean ± spread), the self-perceptual model as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    m, e = np.array([f[0] for f in fds]), np.array([f[1] for f in fds])
    ax.errorbar(scales, m, yerr=e, marker="o", capsize=3, label="MSE model, CFG scale")
    ax.axhline(sp_fd[0], color="C3", linestyle="--", label="self-perceptual, no guidance")
    ax.axhspan(sp_fd[0] - sp_fd[1], sp_fd[0] + sp_fd[1], color="C3", alpha=0.15)
    ax.set_xlabel("classifier-free guidance scale")
    ax.set_ylabel("FD-MNIST (lower is better)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
