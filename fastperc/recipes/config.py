"""The training options, each defined once: default, type, bounds, help, and what may be done with it
(changed on resume, varied by a study, taken from --init's checkpoint). `TrainConfig.validate` checks
them, `fastperc train` builds its flags from them (`add_options`), `fastperc study` accepts the
study options in a variant, a resumed run refuses a change to any option that is not resumable, and
`with_model_options` fills the model options from --init for the CLI and Python callers alike.
`FinetuneConfig` (`fastperc finetune`) takes the options the two commands share from TrainConfig's
definitions (`shared`) and adds its own."""
from __future__ import annotations

import argparse
from dataclasses import MISSING, Field, dataclass, field, fields, replace

from ..loss import FEATURE_NORMS
from ..schedule import DENSITIES, FLOW_PREDICTION_TYPES, PREDICTION_TYPES, TimestepDistribution
from .models import ARCHS
from ..errors import InputError

OBJECTIVES = ("mse", "self_perceptual")

# name -> (test, what the error says was expected)
BOUNDS = {
    "positive": (lambda v: v > 0, "a value > 0"),
    "non_negative": (lambda v: v >= 0, "a value >= 0"),
    "unit_interval": (lambda v: 0 <= v < 1, "a value in [0, 1)"),
    "fraction": (lambda v: 0 < v <= 1, "a value in (0, 1]"),
}


def option(default, help: str, *, type=None, bound: str | None = None, choices=None, flag: str | None = None,
           metavar: str | None = None, model: bool = False, group: str | None = None, cli: bool = True,
           resumable: bool = False, study: bool = True, per_schedule: dict | None = None,
           repeat: bool = False) -> Field:
    """A TrainConfig field with what the CLI and the checks need. `type`: int, float, str, bool, or a
    1-tuple (int,) / (float,) / (str,) for a comma-separated list. `model`: an option that describes the
    model: it defaults to None, "from --init's checkpoint, else `default`" (see `with_model_options`).
    `group`: flags of one group exclude each other. `resumable`: a resumed run may change it (where and
    how long it runs and how it reports, not what it learns). `study`: a `fastperc study` variant may
    set it (not the run's identity: folder, seed, length, teacher). `per_schedule`: the default per
    value of `schedule`, used instead of `default`. `repeat`: a (str,) list given by repeating the flag
    (values may hold commas, e.g. prompts)."""
    meta = dict(help=help, type=type, bound=bound, choices=choices, flag=flag, metavar=metavar, model=model,
                group=group, cli=cli, resumable=resumable, study=study, per_schedule=per_schedule, default=default,
                repeat=repeat)
    if isinstance(default, dict):
        return field(default_factory=dict, metadata=meta)
    return field(default=None if model else default, metadata=meta)


def check_options(cfg) -> None:
    """Every option of a config dataclass against its definition (type, choices, bound); an InputError
    names the option, what was expected and what came."""
    def bad(name, expected, got):
        raise InputError(f"{name}: expected {expected}, got {got!r}")

    for f in fields(cfg):
        value, meta = getattr(cfg, f.name), f.metadata
        if value is None or meta.get("type") is None:
            continue
        declared = meta["type"]
        is_list = isinstance(declared, tuple)
        elem = declared[0] if is_list else declared
        if is_list and not isinstance(value, (tuple, list)):
            bad(f.name, f"a sequence of {elem.__name__}", value)
        for v in (tuple(value) if is_list else (value,)):
            if elem is int and (isinstance(v, bool) or not isinstance(v, int)):
                bad(f.name, "integers" if is_list else "an integer", value)
            if elem is float and (isinstance(v, bool) or not isinstance(v, (int, float))):
                bad(f.name, "a number", value)
            if meta["choices"] is not None and v not in meta["choices"]:
                bad(f.name, f"one of {list(meta['choices'])}", value)
            if meta["bound"] is not None and not BOUNDS[meta["bound"]][0](v):
                bad(f.name, BOUNDS[meta["bound"]][1], value)


class ObjectiveOptions:
    """What both commands' configs do with the options they share (the objective's taps, weights, t'
    draw and teacher share; the run mode)."""

    def check_shared(self) -> None:
        """The shared options' combinations, after `check_options`."""
        self.t_prime_distribution()  # range order, density, loc and scale
        self.t_distribution()  # the same of t, and the mode scale
        for name in ("t_prime_range", "objective_t_range"):
            r = getattr(self, name)
            if r is not None and not (len(r) == 2 and r[0] <= r[1]):
                raise InputError(f"{name}: expected two timesteps low <= high, got {r!r}")
        if self.layer_weights is not None and self.layers is not None and len(self.layer_weights) != len(self.layers):
            raise InputError(f"layer_weights: expected {len(self.layers)} values (one per layer), got "
                             f"{self.layer_weights!r}")
        if self.objective_t_range is not None and self.sp_fraction < 1:
            raise InputError("sp_fraction: --objective-t-range sets the share that gets the objective itself "
                             f"(the band's share of the table); expected 1 with it, got {self.sp_fraction}")
        if self.resume and self.overwrite:
            raise InputError("resume: --resume and --overwrite exclude each other")

    def t_distribution(self, default: str = "uniform") -> TimestepDistribution | None:
        """How the student's t is drawn: --t-density, or `default` when it is unset (a fine-tuned family's
        own: logit-normal for SD3, as diffusers' SD3 scripts draw it); None: uniform over the table
        (TimestepStrata's own draw)."""
        density = self.t_density or default
        drawn = TimestepDistribution(density=density, loc=float(self.t_loc), scale=float(self.t_scale),
                                     mode_scale=float(self.mode_scale))  # checks every option, whatever the density
        return None if density == "uniform" else drawn

    def t_prime_distribution(self) -> TimestepDistribution:
        low, high = self.t_prime_range if self.t_prime_range is not None else (0, None)
        return TimestepDistribution(int(low), None if high is None else int(high), self.t_prime_density,
                                    float(self.t_prime_loc), float(self.t_prime_scale))


@dataclass
class TrainConfig(ObjectiveOptions):
    out: str = option(MISSING, "run folder: checkpoint.pt, log.jsonl", type=str, resumable=True, study=False)
    objective: str = option("mse", "plain MSE, or the self-perceptual objective (needs --init or --teacher)",
                            type=str, choices=OBJECTIVES)
    mse_weight: float = option(0.0, "add this times the MSE loss to the self-perceptual loss", type=float,
                               bound="non_negative")
    init: str | None = option(None, "start from this checkpoint's model and EMA weights (file or run folder)",
                              type=str, resumable=True, study=False)
    teacher: str | None = option(None, "frozen perceptual network checkpoint (default: --init)", type=str,
                                 study=False)
    layers: tuple[str, ...] | None = option(None, "comma-separated teacher layers (default: the library's tap for "
                                            "the architecture: mid_block for a UNet, a mid-depth block for a "
                                            "DiT)", type=(str,))
    layer_weights: tuple[float, ...] | None = option(None, "one weight >= 0 per layer (default 1 each)",
                                                     type=(float,), bound="non_negative")
    feature_norm: str = option("none", "scale each tapped channel by the real features' RMS (per sample), so "
                               "taps weigh alike", type=str, choices=FEATURE_NORMS)
    t_prime_range: tuple[int, int] | None = option(None, "draw the re-noise timestep t' from [LOW, HIGH] "
                                                   "(default the whole table)", type=(int,), bound="non_negative",
                                                   metavar="LOW,HIGH")
    t_prime_density: str = option("uniform", "how t' is drawn over its range", type=str, choices=DENSITIES)
    t_prime_loc: float = option(0.0, "logit-normal location (< 0: low-noise t')", type=float)
    t_prime_scale: float = option(1.0, "logit-normal scale", type=float, bound="positive")
    t_density: str | None = option("uniform", "how the student's t is drawn over the table: uniform (the "
                                   "default), logit_normal or mode (SD3's densities for flow matching)", type=str,
                                   choices=DENSITIES)
    t_loc: float = option(0.0, "logit-normal location of t (< 0: low noise; diffusers' --logit_mean with the sign "
                          "flipped, since fastperc ranks the table from low noise up)", type=float)
    t_scale: float = option(1.0, "logit-normal scale of t", type=float, bound="positive")
    mode_scale: float = option(1.29, "the mode density's scale (SD3's; in [-1, 2 / (pi - 2)])", type=float)
    objective_t_range: tuple[int, int] | None = option(None, "use the self-perceptual objective where t is in "
                                                       "[LOW, HIGH], plain MSE elsewhere: t is drawn so that a "
                                                       "fixed share of each micro-batch (the band's share of the "
                                                       "table, rounded to whole samples) falls in the band, and "
                                                       "only those samples run the teacher", type=(int,),
                                                       bound="non_negative", metavar="LOW,HIGH")
    sp_fraction: float = option(1.0, "the share of each micro-batch that gets the self-perceptual objective (the "
                                "first ceil(f * micro-batch) samples; the rest plain MSE): the teacher runs on "
                                "that share only", type=float, bound="fraction")
    arch: str = option("unet", "the denoiser", type=str, choices=ARCHS, model=True)
    block_channels: tuple[int, ...] = option((32, 64, 128), "UNet channels per resolution level", type=(int,),
                                             bound="positive", flag="--channels-per-level", model=True)
    dit_width: int = option(128, "DiT token width (a multiple of 4; 4 attention heads)", type=int, bound="positive",
                            model=True)
    dit_depth: int = option(6, "DiT blocks", type=int, bound="positive", model=True)
    dit_patch: int = option(0, "DiT patch side in pixels (0: 4 on images of 32 pixels or more, 2 on smaller "
                            "inputs such as 8x8 latents)", type=int, bound="non_negative", model=True)
    conditional: bool = option(False, "class labels, 10% dropped to the null class", type=bool, model=True)
    label_dropout: float = option(0.1, "share of labels replaced by the null class (for CFG)", type=float,
                                  bound="unit_interval")
    prediction_type: str = option("v_prediction", "what the model predicts. ddpm: SD's scaled-linear table "
                                  "rescaled to zero terminal SNR, except for epsilon (which cannot be converted "
                                  "where alpha = 0): the SD 1.5 table. flow: flow_prediction (noise - x0), the "
                                  "default there", type=str, choices=PREDICTION_TYPES + FLOW_PREDICTION_TYPES,
                                  model=True, per_schedule={"ddpm": "v_prediction", "flow": "flow_prediction"})
    schedule: str = option("ddpm", "the noise process: ddpm (variance preserving, 1000 steps) or flow (rectified "
                           "flow, diffusers' FlowMatchEulerDiscreteScheduler table; sampled with Euler steps)",
                           type=str, choices=("ddpm", "flow"), model=True)
    data: str | None = option(None, "a folder of images (class sub-folders optional) or an .npz; default "
                              "MNIST-5k", type=str)
    latent: str | None = option(None, "train in the latent space of this autoencoder (`fastperc "
                                "train-autoencoder`); the checkpoint keeps it, and samples are decoded by it",
                                type=str, metavar="AE")
    image_size: int = option(32, "images are resized to this square", type=int, bound="positive")
    channels: int = option(1, "1: grey, 3: RGB", type=int, choices=(1, 3))
    held_out: int = option(500, "images kept out of training (the evaluation split)", type=int,
                           bound="non_negative")
    split_seed: int = option(0, "seed of the train/held-out split (fixed, whatever the training seed)", type=int)
    batch_size: int = option(64, "global batch per optimizer step", type=int, bound="positive")
    lr: float = option(2e-4, "peak learning rate", type=float, bound="positive")
    optimizer: str = option("adamw", "sgd uses --momentum", type=str, choices=("adamw", "sgd"))
    adam_eps: float = option(1e-8, "AdamW's epsilon", type=float, bound="positive")
    momentum: float = option(0.9, "SGD momentum", type=float, bound="unit_interval")
    warmup_steps: int = option(100, "linear learning-rate warm-up, capped at a fifth of --max-steps for short "
                               "runs", type=int, bound="non_negative")
    lr_schedule: str = option("constant", "the learning rate after the warm-up: constant, or a cosine decay to 0 at "
                              "--max-steps", type=str, choices=("constant", "cosine"))
    weight_decay: float = option(0.0, "AdamW's decoupled weight decay", type=float, bound="non_negative")
    grad_clip: float = option(1.0, "gradient-norm clip; 0 disables clipping", type=float, bound="non_negative")
    grad_accum: int = option(1, "micro-batches per optimizer step", type=int, bound="positive")
    ema_decay: float = option(0.999, "EMA decay, warmed up as (1+step)/(10+step) from step 0", type=float,
                              bound="unit_interval")
    precision: str = option("fp32", "bf16: autocast student and teacher", type=str, choices=("fp32", "bf16"))
    compile: bool = option(False, "torch.compile the student and the teacher", type=bool, resumable=True)
    teacher_precision: str = option("same", "the teacher's weights: as the student's (same), bf16, or fp8 (Linear "
                                    "layers in FP8, the rest bf16; CUDA sm_89 or newer, or the CPU)", type=str,
                                    choices=("same", "bf16", "fp8"))
    teacher_checkpoint: bool = option(False, "recompute the teacher's activations in backward, one stage at a "
                                      "time (less memory, one more teacher forward)", type=bool, resumable=True)
    fsdp: bool = option(False, "under torchrun: shard the student, its EMA and optimizer state (FSDP2) and the "
                        "teacher over the processes instead of replicating them (DDP)", type=bool, study=False,
                        resumable=True)
    seed: int = option(0, "seeds every draw of every step (exact resume)", type=int, study=False)
    max_steps: int = option(1000, "optimizer steps in all", type=int, bound="non_negative", resumable=True,
                            study=False)
    save_every: int = option(500, "checkpoint every N steps (the previous one is kept as checkpoint.prev.pt)",
                             type=int, bound="positive", resumable=True)
    log_every: int = option(10, "a log.jsonl line every N steps", type=int, bound="positive", resumable=True)
    max_bad_steps: int = option(5, "stop after this many steps in a row with a NaN/Inf loss or gradient (each is "
                                "skipped: no optimizer, EMA or LR-schedule step); checked on logging steps",
                                type=int, bound="positive", resumable=True)
    resume: bool = option(False, "continue from OUT/checkpoint.pt when present (with the same options)",
                          type=bool, group="run_mode", resumable=True, study=False)
    overwrite: bool = option(False, "start over in an OUT that holds a run (else that is an error)", type=bool,
                             group="run_mode", resumable=True)
    progress: bool = option(True, "no progress bar", type=bool, flag="--no-progress", resumable=True, study=False)
    extra: dict = option({}, "free-form notes kept in the checkpoint", cli=False, resumable=True)

    def validate(self) -> None:
        """Every option against its definition, then the combinations; a ValueError names the option."""
        check_options(self)
        self.check_shared()
        if self.objective == "self_perceptual" and not (self.teacher or self.init):
            raise InputError("teacher: the self_perceptual objective needs a frozen MSE-trained network; "
                             "pass --teacher CKPT or --init CKPT")
        flow = self.prediction_type in FLOW_PREDICTION_TYPES
        if self.schedule is not None and self.prediction_type is not None and (self.schedule == "flow") != flow:
            expected = "flow_prediction" if self.schedule == "flow" else f"one of {list(PREDICTION_TYPES)}"
            raise InputError(f"prediction_type: the {self.schedule} schedule trains {expected}, got "
                             f"{self.prediction_type!r}")
        if self.arch == "dit" and self.dit_width is not None and self.dit_width % 4:
            raise InputError(f"dit_width: expected a multiple of 4, got {self.dit_width!r}")
        if self.arch == "dit" and self.dit_patch and not self.latent and self.image_size % self.dit_patch:
            raise InputError(f"dit_patch: expected a divisor of image_size={self.image_size}, got {self.dit_patch!r}")


# What each option's metadata says, gathered once for the places that ask.
# Options that describe the model (with --init they come from the checkpoint), with their defaults.
MODEL_OPTIONS = {f.name: f.metadata["default"] for f in fields(TrainConfig) if f.metadata.get("model")}
# Options a resumed run may change.
RESUMABLE_OPTIONS = frozenset(f.name for f in fields(TrainConfig) if f.metadata.get("resumable"))
# Options a study variant (or its base) may set.
STUDY_OPTIONS = frozenset(f.name for f in fields(TrainConfig) if f.metadata.get("study"))


def flag_of(name: str) -> str:
    """The command-line flag of a TrainConfig option."""
    meta = next(f.metadata for f in fields(TrainConfig) if f.name == name)
    return meta["flag"] or "--" + name.replace("_", "-")


def _plain(value):
    return tuple(value) if isinstance(value, list) else value


def with_model_options(cfg: TrainConfig, held: dict | None, source: str | None = None) -> TrainConfig:
    """`cfg` with every model option set. With `held` (the model options of the checkpoint the model
    comes from, from `models.model_options_of`: --init's, or the one being resumed, named by `source`)
    they come from it, and one set in `cfg` that disagrees is an InputError naming it; without, an unset
    option takes its default (per schedule where the option has one, e.g. flow_prediction for the flow
    schedule). The same for the CLI and for Python callers."""
    given = {k: _plain(getattr(cfg, k)) for k in MODEL_OPTIONS if getattr(cfg, k) is not None}
    if held is not None:
        source = source or cfg.init
        bad = [k for k, v in given.items() if v != _plain(held[k])]
        if bad:
            what = "init" if source == cfg.init else "resume"
            raise InputError(f"{what}: " + "; ".join(f"{flag_of(k)} {given[k]!r} disagrees with {source}, which "
                                                     f"holds {held[k]!r}" for k in bad)
                             + " (omit them: the checkpoint sets the model)")
        return replace(cfg, **{k: held[k] for k in MODEL_OPTIONS})
    values = {**MODEL_OPTIONS, **given}
    for f in fields(TrainConfig):
        per_schedule = f.metadata.get("per_schedule")
        if per_schedule and f.name not in given:
            values[f.name] = per_schedule[values["schedule"]]
    return replace(cfg, **values)


def bounded(kind: type, bound: str | None = None):
    """An argparse type: `kind` (int, float, str) within `bound` (a BOUNDS name), with the message
    TrainConfig.validate gives."""
    test, expected = BOUNDS[bound] if bound else (None, None)

    def parse(s: str):
        v = kind(s.strip())
        if test is not None and not test(v):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {s}")
        return v
    return parse


def _argparse_type(meta):
    """The flag's parser: the field's type (a comma-separated list for tuples) and its bound."""
    declared = meta["type"]
    if isinstance(declared, tuple):
        one = bounded(declared[0], meta["bound"])
        return lambda s: tuple(one(x) for x in s.split(",") if x.strip())
    return bounded(declared, meta["bound"])


def add_options(parser: argparse.ArgumentParser, config: type) -> None:
    """One flag per option of `config` (TrainConfig, FinetuneConfig): --name-with-dashes, its type, bound,
    choices and help. Model options default to None (filled from --init's checkpoint, else their
    defaults); a `repeat` option is given once per value."""
    groups: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in fields(config):
        meta = f.metadata
        if not meta.get("cli"):
            continue
        flag = meta["flag"] or "--" + f.name.replace("_", "-")
        help_text = meta["help"].replace("%", "%%")
        target = parser
        if meta["group"]:
            if meta["group"] not in groups:
                groups[meta["group"]] = parser.add_mutually_exclusive_group()
            target = groups[meta["group"]]
        kw = dict(dest=f.name, help=help_text)
        if isinstance(f.default, tuple) and not meta["model"] and not meta.get("repeat"):
            kw["help"] = f"{help_text} (default: {','.join(map(str, f.default))})"
        if meta["model"]:
            default = meta["default"]
            default = ",".join(map(str, default)) if isinstance(default, tuple) else default
            if meta["per_schedule"]:
                default = ", ".join(f"{v} for --schedule {k}" for k, v in meta["per_schedule"].items())
            kw["help"] = f"{help_text} (default: {default}; with --init: the checkpoint's)"
            kw["default"] = None
        if meta["type"] is bool:
            kw.setdefault("default", f.default)
            kw["action"] = "store_false" if f.default is True else "store_true"
        elif meta.get("repeat"):
            kw.update(action="append", default=None, type=str, metavar=meta["metavar"] or "TEXT")
        else:
            kw["type"] = _argparse_type(meta)
            if f.default is MISSING:
                kw["required"] = True
            else:
                kw.setdefault("default", f.default)
            if meta["choices"] is not None:
                kw["choices"] = list(meta["choices"])
            if meta["metavar"]:
                kw["metavar"] = meta["metavar"]
        target.add_argument(flag, **kw)


def add_train_options(parser: argparse.ArgumentParser) -> None:
    """The flags of `fastperc train`: one per TrainConfig option."""
    add_options(parser, TrainConfig)


def config_from_args(args: argparse.Namespace, config: type = TrainConfig):
    """The config (TrainConfig by default) of parsed flags; a repeated flag given no time keeps its default."""
    values = {}
    for f in fields(config):
        if not f.metadata.get("cli"):
            continue
        value = getattr(args, f.name)
        if f.metadata.get("repeat"):
            value = f.default if value is None else tuple(value)
        values[f.name] = value
    return config(**values)


# ---- fastperc finetune ---------------------------------------------------------------------------
_TRAIN_FIELDS = {f.name: f for f in fields(TrainConfig)}


def shared(name: str, **changes) -> Field:
    """A FinetuneConfig option defined by TrainConfig's option `name` (type, bounds, choices, help, and
    whether a resumed run may change it), with `changes` to its metadata where fine-tuning a pretrained
    model needs another default or help (`default=...`, `help=...`)."""
    meta = {**_TRAIN_FIELDS[name].metadata, **changes}
    return field(default=meta["default"], metadata=meta)


@dataclass(kw_only=True)
class FinetuneConfig(ObjectiveOptions):
    """The options of `fastperc finetune`: a diffusers pipeline folder fine-tuned on captioned images."""
    out: str = shared("out", help="run folder: checkpoint/ (accelerate's state), log.jsonl, cache/ (encoded "
                                  "latents and captions), validation/ (PNG grids), final/ (at the end: the "
                                  "fine-tuned pipeline, or with --lora-rank its LoRA weights)")
    pretrained: str = option(MISSING, "a diffusers pipeline folder (Stable Diffusion 1.x / 2.x, XL, 3 / 3.5, Flux), "
                             "loaded with local files only; its denoiser (UNet or transformer) is fine-tuned and its "
                             "frozen copy is the teacher", type=str, study=False)
    data: str = option(MISSING, "a folder of images with captions in metadata.jsonl (file_name, text), or a Hugging "
                       "Face datasets dataset saved with save_to_disk (columns image, text)", type=str)
    resolution: int = option(512, "images are resized (shorter side) and centre-cropped to this square; a multiple of "
                             "what the VAE and the denoiser downsample by (64 for Stable Diffusion 1.x / 2.x, 32 "
                             "for XL, 16 for SD3 and Flux)", type=int,
                             bound="positive")
    random_crop: bool = option(False, "a random crop and flip per step, encoded by the VAE each step (default: the "
                               "centre crop and its mirror image, encoded once and cached)", type=bool)
    caption_dropout: float = option(0.1, "share of captions replaced by the empty prompt (what classifier-free "
                                    "guidance needs)", type=float, bound="unit_interval")
    unconditional: bool = option(False, "train on the empty prompt only; then images need no captions", type=bool)
    strict: bool = option(False, "an image that cannot be read is an error (default: skipped and counted)",
                          type=bool)
    validation_prompt: tuple[str, ...] = option((), "a prompt sampled at each validation; repeat the flag for "
                                                "several (default: the first two distinct captions of the data)",
                                                type=(str,),
                                                repeat=True, metavar="PROMPT", resumable=True)
    validate_every: int = option(0, "validation images every N steps (0: at the end only)", type=int,
                                 bound="non_negative", resumable=True)
    validation_cfg: float = option(0.0, "also sample at this classifier-free guidance scale, > 1 (0: without "
                                   "guidance only)", type=float, bound="non_negative", resumable=True)
    validation_steps: int = option(25, "sampling steps per validation image", type=int, bound="positive",
                                   resumable=True)
    gradient_checkpointing: bool = option(False, "recompute the fine-tuned denoiser's activations in backward (less "
                                          "memory, one more forward)", type=bool, resumable=True)
    lora_rank: int = option(0, "train LoRA adapters of this rank on the denoiser's attention projections (peft) "
                            "instead of the whole denoiser; the teacher is then the same model with its adapters off "
                            "(no copy), "
                            "and OUT/final holds the LoRA weights (pipe.load_lora_weights)", type=int,
                            bound="non_negative")
    t_density: str | None = shared("t_density", default=None, help="how the student's t is drawn over the schedule's "
                                   "table: uniform, logit_normal or mode (default: the family's, as diffusers' scripts "
                                   "draw it: logit_normal for SD3, uniform for the others)")
    t_loc: float = shared("t_loc")
    t_scale: float = shared("t_scale")
    mode_scale: float = shared("mode_scale")
    flux_guidance: float = option(3.5, "the guidance value a guidance-distilled Flux transformer (FLUX.1-dev) gets "
                                  "in training and in validation images (diffusers' Flux scripts: 3.5)", type=float,
                                  bound="non_negative")
    objective: str = shared("objective", default="self_perceptual",
                            help="self_perceptual: the frozen pretrained denoiser is the teacher; mse: the equal-step "
                                 "baseline to compare against")
    mse_weight: float = shared("mse_weight")
    layers: tuple[str, ...] | None = shared("layers", help="comma-separated teacher layers (default: the library's tap: mid_block for a "
                                                 "UNet, a mid-depth block for a transformer)")
    layer_weights: tuple[float, ...] | None = shared("layer_weights")
    feature_norm: str = shared("feature_norm")
    t_prime_range: tuple[int, int] | None = shared("t_prime_range")
    t_prime_density: str = shared("t_prime_density")
    t_prime_loc: float = shared("t_prime_loc")
    t_prime_scale: float = shared("t_prime_scale")
    objective_t_range: tuple[int, int] | None = shared("objective_t_range")
    sp_fraction: float = shared("sp_fraction")
    batch_size: int = shared("batch_size", default=8)
    lr: float = shared("lr", default=1e-5)
    adam_eps: float = shared("adam_eps")
    weight_decay: float = shared("weight_decay")
    grad_clip: float = shared("grad_clip")
    grad_accum: int = shared("grad_accum")
    warmup_steps: int = shared("warmup_steps")
    lr_schedule: str = shared("lr_schedule")
    ema_decay: float = shared("ema_decay", help="EMA decay, warmed up as (1+step)/(10+step); 0: no EMA (the final "
                                                "pipeline gets the EMA weights when there are)")
    precision: str = shared("precision")
    teacher_precision: str = shared("teacher_precision", help="the teacher's weights: as the pretrained denoiser's "
                                    "(same: fp32 as loaded, even with --precision bf16), bf16, or fp8 (Linear layers in "
                                    "FP8, the rest bf16; CUDA sm_89 or newer, or the CPU); not with --lora-rank")
    teacher_checkpoint: bool = shared("teacher_checkpoint")
    seed: int = shared("seed")
    max_steps: int = shared("max_steps")
    save_every: int = shared("save_every", help="checkpoint every N steps (and on SIGTERM / Ctrl-C)")
    log_every: int = shared("log_every")
    max_bad_steps: int = shared("max_bad_steps")
    resume: bool = shared("resume", help="continue from OUT/checkpoint when present, with the same options (where "
                                         "and how long it runs and reports may change: a larger --max-steps extends "
                                         "a finished run); without a checkpoint it starts fresh")
    overwrite: bool = shared("overwrite")
    progress: bool = shared("progress")

    def validate(self) -> None:
        """Every option against its definition, then the combinations; an InputError names the option."""
        check_options(self)
        self.check_shared()
        if self.lora_rank and (self.teacher_precision != "same" or self.teacher_checkpoint):
            raise InputError("lora_rank: a LoRA run's teacher is the model being trained, with its adapters off; "
                             "--teacher-precision and --teacher-checkpoint would change that model (leave them out)")
        if 0 < self.validation_cfg <= 1:  # a scale of 1 or less is no guidance: the first column already
            raise InputError(f"validation_cfg: expected 0 (no guided column) or a guidance scale > 1, got "
                             f"{self.validation_cfg}")


FINETUNE_RESUMABLE_OPTIONS = frozenset(f.name for f in fields(FinetuneConfig) if f.metadata.get("resumable"))
