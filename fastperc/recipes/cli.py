"""The `fastperc` command: train, sample, demo, info. Bad values exit with code 2 and a clear message."""
from __future__ import annotations

import argparse
import os
import sys

from .config import FinetuneConfig, add_options, add_train_options, bounded, config_from_args
from ..errors import InputError, MissingFileError


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None, the flag is required or a switch-off, or the help
    already says it."""

    def _get_help_string(self, action):
        if (action.default is None or action.required or isinstance(action, argparse._StoreFalseAction)
                or "default" in (action.help or "")):
            return action.help
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    """Every (sub)command's --help shows every default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Formatter)
        super().__init__(*args, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    parser = _Parser(prog="fastperc", description="Self-perceptual diffusion training")
    parser.add_argument("--version", action="version", version=f"fastperc {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sub.add_parser("info", help="versions, built kernels and the backend auto picks")

    tr = sub.add_parser("train", help="train with MSE or the self-perceptual objective")
    add_train_options(tr)

    ft = sub.add_parser("finetune", help="fine-tune a diffusers pipeline folder (Stable Diffusion 1.x / 2.x, XL, 3 / "
                                         "3.5, Flux) on captioned images; its frozen denoiser is the teacher")
    add_options(ft, FinetuneConfig)

    sa = sub.add_parser("sample", help="DDIM samples from a checkpoint to FILE.npz and FILE.png")
    sa.add_argument("checkpoint", help="a checkpoint file or run folder")
    sa.add_argument("--out", required=True, help="FILE.npz (a PNG grid is written beside it)")
    sa.add_argument("--n", type=bounded(int, "positive"), default=100, help="images (classes in turn for conditional models)")
    sa.add_argument("--steps", type=bounded(int, "positive"), default=50, help="DDIM steps (trailing spacing)")
    sa.add_argument("--cfg-scale", type=bounded(float, "non_negative"), default=1.0, help="classifier-free guidance (1: none)")
    sa.add_argument("--guidance-rescale", type=bounded(float, "non_negative"), default=0.0, help="CFG rescale (0: none)")
    sa.add_argument("--seed", type=int, default=0, help="seed of the initial noise")
    sa.add_argument("--batch-size", type=bounded(int, "positive"), default=250, help="images per forward pass")
    ema = sa.add_mutually_exclusive_group()
    ema.add_argument("--ema", dest="ema", action="store_true", default=True, help="use the EMA weights (default)")
    ema.add_argument("--no-ema", dest="ema", action="store_false", help="use the raw weights")

    tc = sub.add_parser("train-classifier", help="the feature network of the metrics (MNIST-5k)")
    tc.add_argument("--out", default="runs/classifier", help="folder for classifier.pt")
    tc.add_argument("--epochs", type=bounded(int, "positive"), default=15, help="passes over the 4500 training digits")
    tc.add_argument("--seed", type=int, default=0, help="initialisation and data order")

    au = sub.add_parser("train-autoencoder", help="the latent space of a latent diffusion run (train --latent)")
    au.add_argument("--out", default="runs/autoencoder", help="folder for autoencoder.pt")
    au.add_argument("--steps", type=bounded(int, "positive"), default=2000, help="optimizer steps at batch 64")
    au.add_argument("--width", type=bounded(int, "positive"), default=32, help="channels of the inner convolutions")
    au.add_argument("--latent-channels", type=bounded(int, "positive"), default=4, help="latent channels (at 1/4 resolution)")
    au.add_argument("--data", help="as for train (default MNIST-5k); the held-out split is never seen")
    au.add_argument("--image-size", type=bounded(int, "positive"), default=32, help="images are resized to this square")
    au.add_argument("--channels", type=int, choices=[1, 3], default=1, help="1: grey, 3: RGB")
    au.add_argument("--seed", type=int, default=0, help="initialisation and data order")

    ev = sub.add_parser("eval", help="FD-MNIST, classifier score, precision/recall of sample files")
    ev.add_argument("samples", nargs="+", help="FILE.npz from `fastperc sample` / the demo")
    ev.add_argument("--classifier", default=None,
                    help="classifier from train-classifier (default: a classifier/ folder beside the samples or "
                         "up to three folders above them, as the demo and study write it)")
    ev.add_argument("--k", type=bounded(int, "positive"), default=3, help="neighbours for precision/recall")

    st = sub.add_parser("study", help="fine-tune variants of one MSE model with equal steps, sample, evaluate, "
                                      "tabulate over seeds")
    st.add_argument("spec", help="a TOML spec ([study] and [[variant]] tables; see `python -m pydoc fastperc.recipes.study`)")
    st.add_argument("--out", help="output folder (default: the spec's [study] out, else the spec's path without .toml)")
    st.add_argument("--no-progress", action="store_true", help="no progress bars")

    de = sub.add_parser("demo", help="the main job: MSE teacher, self-perceptual fine-tune, samples")
    de.add_argument("--out", default="runs/demo", help="output folder")
    de.add_argument("--preset", choices=["default", "quick", "long", "gpu", "full"], default="default",
                    help="full: the long preset once per training seed 0, 1, 2, with the spread (hours)")
    de.add_argument("--seed", type=int, default=0, help="training and sampling seed")
    de.add_argument("--arch", choices=["unet", "dit"], default="unet", help="the denoiser (dit: fastperc's small DiT)")
    de.add_argument("--schedule", choices=["ddpm", "flow"], default="ddpm",
                    help="the noise process (flow: rectified flow, sampled with Euler steps)")
    de.add_argument("--fresh", action="store_true", help="ignore checkpoints of an earlier run in --out")
    de.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


# Modules of the application's extras (`pip install fastperc[train]`, `fastperc[finetune]`): the library
# itself needs only torch and numpy, so a plain install reaches them only when a command runs.
TRAIN_EXTRA = {"scipy": "scipy", "PIL": "Pillow", "matplotlib": "matplotlib", "mlxtend": "mlxtend", "tqdm": "tqdm"}
FINETUNE_EXTRA = {"diffusers": "diffusers", "transformers": "transformers", "accelerate": "accelerate", "peft": "peft",
                  "datasets": "datasets"}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return _dispatch(args)
    except ModuleNotFoundError as e:
        top = (e.name or "").split(".")[0]
        extra = "finetune" if args.command == "finetune" and top in FINETUNE_EXTRA else "train"
        package = (FINETUNE_EXTRA if extra == "finetune" else TRAIN_EXTRA).get(top)
        if package is None or os.environ.get("FASTPERC_DEBUG"):
            raise
        print(f"fastperc {args.command}: error: needs {package}, which is not installed; install the "
              f"application's extra: pip install 'fastperc[{extra}]'", file=sys.stderr)
        return 2
    # What the user can fix (InputError: bad values found after parsing, missing files, a checkpoint
    # that does not fit its model, a run that diverged): one line, exit code 2. Anything else is a
    # bug or a failure inside a model and keeps its traceback.
    except InputError as e:
        if os.environ.get("FASTPERC_DEBUG"):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"fastperc {args.command}: error: {first} (FASTPERC_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2


def _find_classifier(samples: list[str]) -> str:
    """A classifier/ folder beside the first samples file or up to three folders above it."""
    from pathlib import Path
    here = Path(samples[0]).resolve().parent
    for folder in [here, *here.parents][:4]:
        if (folder / "classifier" / "classifier.pt").exists():
            return str(folder / "classifier")
    raise MissingFileError(f"classifier: none given and no classifier/ folder beside {samples[0]} or above it; "
                            "train one with `fastperc train-classifier --out DIR` and pass --classifier DIR")


def _dispatch(args) -> int:
    if args.command == "info":
        from ..info import main as info
        info()
        return 0
    if args.command == "train":
        from .train import train
        cfg = config_from_args(args)  # model options left unset come from --init (or their defaults)
        try:
            result = train(cfg)
        finally:
            import torch.distributed as dist
            if dist.is_available() and dist.is_initialized():
                # Under torchrun: tear gloo/nccl down before exit (left to interpreter shutdown, gloo's
                # threads can abort the process with "terminate called without an active exception").
                dist.destroy_process_group()
        if result["interrupted"]:
            print(f"interrupted at step {result['step']}: checkpoint saved to {result['checkpoint']}; "
                  "continue with --resume", file=sys.stderr)
            return 128 + result["interrupted"]
        if result["steps_run"] == 0 and result["finished"]:
            print(f"already finished: {result['step']} steps (--max-steps {args.max_steps}), checkpoint "
                  f"{result['checkpoint']}; raise --max-steps to train further")
            return 0
        loss = "n/a" if result["loss"] is None else f"{result['loss']:.5f}"
        print(f"done: {result['step']} steps, loss {loss}, checkpoint {result['checkpoint']}")
        return 0
    if args.command == "finetune":
        from .finetune import finetune
        result = finetune(config_from_args(args, FinetuneConfig))
        if result["interrupted"]:
            print(f"interrupted at step {result['step']}: checkpoint saved to {args.out}/checkpoint; continue with "
                  "--resume", file=sys.stderr)
            return 128 + result["interrupted"]
        skipped = f" ({result['skipped_images']} unreadable images skipped)" if result["skipped_images"] else ""
        loss = "n/a" if result["loss"] is None else f"{result['loss']:.5f}"
        what = "the LoRA weights" if args.lora_rank else "the fine-tuned pipeline"
        print(f"done: {result['step']} steps, loss {loss}{skipped}; {what}: {result['pipeline']}")
        return 0
    if args.command == "sample":
        import torch

        from .sample import generate, save_samples
        from .models import load_model
        model, model_config = load_model(args.checkpoint, use_ema=args.ema)
        if args.cfg_scale != 1.0 and model_config.get("num_classes") is None:
            raise InputError("cfg-scale: guidance needs a conditional model (trained with --conditional)")
        imgs, labels = generate(model, model_config, args.n, steps=args.steps, cfg_scale=args.cfg_scale,
                                guidance_rescale=args.guidance_rescale, seed=args.seed, batch_size=args.batch_size,
                                device="cuda" if torch.cuda.is_available() else "cpu")
        npz, png = save_samples(imgs, labels, args.out)
        print(f"wrote {len(imgs)} images to {npz} and a grid to {png}")
        return 0
    if args.command == "train-classifier":
        from .metrics import train_classifier
        result = train_classifier(args.out, epochs=args.epochs, seed=args.seed)
        print(f"held-out accuracy {result['accuracy']:.4f}; checkpoint {result['checkpoint']}")
        return 0
    if args.command == "train-autoencoder":
        from .latent import train_autoencoder
        result = train_autoencoder(args.out, steps=args.steps, width=args.width, latent_channels=args.latent_channels,
                                   seed=args.seed, data_path=args.data, image_size=args.image_size,
                                   channels=args.channels)
        print(f"held-out reconstruction MSE {result['held_out_mse']:.5f}, latent scale {result['scale']:.4f}; "
              f"checkpoint {result['checkpoint']}")
        return 0
    if args.command == "eval":
        from .metrics import evaluate, load_classifier, load_samples, reference_of, reference_set
        clf = load_classifier(args.classifier or _find_classifier(args.samples))
        ref = reference_of(clf, reference_set().images)
        print(f"{'file':40s} {'n':>5s} {'FD-MNIST':>9s} {'cls-score':>9s} {'precision':>9s} {'recall':>7s} "
              f"{'class-TV':>8s} {'ink/real':>8s} {'label-acc':>9s}")
        for path in args.samples:
            imgs, labels = load_samples(path)
            m = evaluate(imgs, labels, clf, ref, k=args.k)
            acc = f"{m['label_accuracy']:.3f}" if "label_accuracy" in m else "-"
            print(f"{path:40s} {m['n']:5d} {m['fd']:9.3f} {m['classifier_score']:9.3f} {m['precision']:9.3f} "
                  f"{m['recall']:7.3f} {m['class_tv']:8.3f} {m['ink_ratio']:8.3f} {acc:>9s}")
        return 0
    if args.command == "study":
        from .study import load_spec, run
        try:
            run(load_spec(args.spec, args.out), progress=not args.no_progress)
        except KeyboardInterrupt as stop:
            print("study: interrupted; run the same command again to continue", file=sys.stderr)
            return 128 + (int(stop.args[0]) if stop.args else 2)
        return 0
    if args.command == "demo":
        from .demo import run
        result = run(args.out, args.preset, args.seed, progress=not args.no_progress, resume=not args.fresh,
                     arch=args.arch, schedule=args.schedule)
        return 128 + result["interrupted"] if result.get("interrupted") else 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
