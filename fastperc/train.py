"""The training loop: plain MSE or the self-perceptual objective, EMA, bf16 autocast, torch.compile,
atomic checkpoints with exact resume, DDP under torchrun, and a JSONL log.

Every random draw of step k (batch indices, noise, t, t', label dropout) comes from a generator
seeded by (seed, k) and is made for the whole global batch on every rank, each rank taking its
slice: a resumed run repeats the uninterrupted one, and N processes match one with the same batch.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import signal
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import checkpoint, data, latent
from .loss import FEATURE_NORMS, self_perceptual_loss
from .models.factory import ARCHS, build_model, null_class, predict, schedule_of
from .schedule import PREDICTION_TYPES, TimestepDistribution
from .teacher import FrozenTeacher

OBJECTIVES = ("mse", "self_perceptual")


@dataclass
class TrainConfig:
    out: str
    objective: str = "mse"
    mse_weight: float = 0.0             # extra MSE term added to the self-perceptual loss
    init: str | None = None             # start from this checkpoint's model (and EMA) weights
    teacher: str | None = None          # frozen perceptual network; default: init
    layers: tuple[str, ...] = ("mid_block",)
    layer_weights: tuple[float, ...] | None = None
    feature_norm: str = "none"          # "channel_rms": each tapped channel scaled by the real features' RMS
    t_prime_range: tuple[int, int] | None = None   # [low, high] of t' (default the whole table)
    t_prime_density: str = "uniform"    # or "logit_normal" (t_prime_loc, t_prime_scale)
    t_prime_loc: float = 0.0
    t_prime_scale: float = 1.0
    objective_t_range: tuple[int, int] | None = None  # self-perceptual where t is in [low, high], MSE elsewhere
    arch: str = "unet"
    block_channels: tuple[int, ...] = (32, 64, 128)
    conditional: bool = False
    label_dropout: float = 0.1
    prediction_type: str = "v_prediction"
    data: str | None = None             # None: embedded MNIST-5k
    latent: str | None = None           # an autoencoder (`fastperc train-autoencoder`): train on its latents
    image_size: int = 32
    channels: int = 1
    held_out: int = 500
    split_seed: int = 0                 # the train/held-out split: fixed, whatever the training seed
    batch_size: int = 64                # global batch per optimizer step
    lr: float = 2e-4
    optimizer: str = "adamw"            # "adamw" or "sgd" (with momentum)
    adam_eps: float = 1e-8
    momentum: float = 0.9               # sgd only
    warmup_steps: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    grad_accum: int = 1
    ema_decay: float = 0.999
    precision: str = "fp32"
    compile: bool = False
    seed: int = 0
    max_steps: int = 1000
    save_every: int = 500
    log_every: int = 10
    max_bad_steps: int = 5              # stop after this many non-finite steps in a row (each is skipped)
    resume: bool = False
    overwrite: bool = False             # start over in an `out` that holds a run (else that is an error)
    progress: bool = True
    extra: dict = field(default_factory=dict)  # free-form notes kept in the checkpoint

    def validate(self) -> None:
        def bad(name, expected, got):
            raise ValueError(f"{name}: expected {expected}, got {got!r}")

        if self.objective not in OBJECTIVES:
            bad("objective", f"one of {list(OBJECTIVES)}", self.objective)
        if self.arch not in ARCHS:
            bad("arch", f"one of {list(ARCHS)}", self.arch)
        if self.prediction_type not in PREDICTION_TYPES:
            bad("prediction_type", f"one of {list(PREDICTION_TYPES)}", self.prediction_type)
        if self.optimizer not in ("adamw", "sgd"):
            bad("optimizer", "'adamw' or 'sgd'", self.optimizer)
        if not (self.adam_eps > 0 and 0 <= self.momentum < 1):
            bad("adam_eps/momentum", "adam_eps > 0 and momentum in [0, 1)", (self.adam_eps, self.momentum))
        if self.feature_norm not in FEATURE_NORMS:
            bad("feature_norm", f"one of {list(FEATURE_NORMS)}", self.feature_norm)
        self.t_prime_distribution()  # validates range, density, loc and scale
        for name in ("t_prime_range", "objective_t_range"):
            r = getattr(self, name)
            if r is not None and not (len(r) == 2 and 0 <= r[0] <= r[1]):
                bad(name, "two timesteps low <= high", r)
        if self.precision not in ("fp32", "bf16"):
            bad("precision", "'fp32' or 'bf16'", self.precision)
        for name in ("max_steps", "save_every", "log_every", "batch_size", "grad_accum", "image_size", "channels",
                     "max_bad_steps"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < (0 if name == "max_steps" else 1):
                bad(name, "a positive integer" if name != "max_steps" else "an integer >= 0", getattr(self, name))
        if self.channels not in (1, 3):
            bad("channels", "1 or 3", self.channels)
        for name in ("lr", "mse_weight", "weight_decay", "grad_clip", "warmup_steps"):
            if not getattr(self, name) >= 0:
                bad(name, "a value >= 0", getattr(self, name))
        if not 0 <= self.ema_decay < 1:
            bad("ema_decay", "a value in [0, 1)", self.ema_decay)
        if not 0 <= self.label_dropout < 1:
            bad("label_dropout", "a value in [0, 1)", self.label_dropout)
        if self.objective == "self_perceptual" and not (self.teacher or self.init):
            raise ValueError("teacher: the self_perceptual objective needs a frozen MSE-trained network; "
                             "pass --teacher CKPT or --init CKPT")
        if self.layer_weights is not None and len(self.layer_weights) != len(self.layers):
            bad("layer_weights", f"{len(self.layers)} values (one per layer)", self.layer_weights)


    def t_prime_distribution(self) -> TimestepDistribution:
        low, high = self.t_prime_range if self.t_prime_range is not None else (0, None)
        return TimestepDistribution(int(low), None if high is None else int(high), self.t_prime_density,
                                    float(self.t_prime_loc), float(self.t_prime_scale))


# ---- distributed --------------------------------------------------------------------------------
def _setup_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    if world > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _all_mean(x: torch.Tensor, world: int) -> torch.Tensor:
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
        x /= world
    return x


# ---- pieces ---------------------------------------------------------------------------------------
@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, apply: torch.Tensor | None = None) -> None:
    """ema += (1 - decay) * (model - ema). `apply`, a 0-d device tensor (1 or 0), gates the update
    without a host sync: a skipped (non-finite) step leaves the EMA as it was."""
    ema_p, p = list(ema.parameters()), list(model.parameters())
    if apply is None:
        torch._foreach_lerp_(ema_p, p, 1.0 - decay)
    else:
        delta = torch._foreach_sub(p, ema_p)
        torch._foreach_mul_(delta, apply.to(ema_p[0].dtype) * (1.0 - decay))
        torch._foreach_add_(ema_p, delta)
    for eb, b in zip(ema.buffers(), model.buffers()):
        eb.copy_(b)


def _step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + step)


def model_config_of(cfg: TrainConfig, num_classes: int | None) -> dict:
    mconf = {"arch": cfg.arch, "in_channels": cfg.channels, "image_size": cfg.image_size,
             "block_channels": list(cfg.block_channels), "num_classes": num_classes if cfg.conditional else None,
             "prediction_type": cfg.prediction_type, "zero_terminal_snr": cfg.prediction_type != "epsilon"}
    if cfg.latent:
        # The autoencoder travels inside the model config: samples decode with exactly these weights.
        ae = latent.load_autoencoder(cfg.latent)
        channels, size, _ = ae.latent_shape(cfg.image_size)
        if ae.config["in_channels"] != cfg.channels:
            raise ValueError(f"latent: {cfg.latent} encodes {ae.config['in_channels']}-channel images, the data "
                             f"has {cfg.channels} (--channels)")
        mconf |= {"in_channels": channels, "image_size": size,
                  "autoencoder": {"autoencoder": ae.state_dict(), "config": ae.config}}
    return mconf


def load_model(path: str, use_ema: bool = False) -> tuple[nn.Module, dict]:
    """The model (or its EMA) stored in a checkpoint, and its model config."""
    ckpt = checkpoint.load(path)
    model = build_model(ckpt["model_config"])
    model.load_state_dict(ckpt["ema" if use_ema else "model"])
    return model, ckpt["model_config"]


class _StopFlag:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the end of the step and exits."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            try:
                self._old[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


# ---- the loop ----------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> dict:
    """Run (or resume) one training job; returns {"step", "steps_run", "loss", "interrupted", "checkpoint"}."""
    cfg.validate()
    rank, world, device = _setup_distributed()
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(f"batch_size: expected a multiple of processes x grad_accum = {world * cfg.grad_accum}, "
                         f"got {cfg.batch_size}")
    out = Path(cfg.out)
    ckpt_path = out / "checkpoint.pt"
    torch.manual_seed(cfg.seed)

    images = data.load(cfg.data, cfg.image_size, cfg.channels)
    train_set, _ = images.split(min(cfg.held_out, len(images) // 10), cfg.split_seed)
    if cfg.conditional and train_set.labels is None:
        raise ValueError("conditional: the data has no labels (use class sub-folders or an .npz with 'labels')")
    if train_set.images.shape[1:] != (cfg.channels, cfg.image_size, cfg.image_size):
        raise ValueError(f"data: images are {tuple(train_set.images.shape[1:])}, expected "
                         f"({cfg.channels}, {cfg.image_size}, {cfg.image_size}) (set --channels/--image-size)")

    resume = cfg.resume and ckpt_path.exists()
    if not cfg.resume and rank == 0:
        _refuse_or_clear_earlier_run(out, cfg.overwrite)
    state = checkpoint.load(ckpt_path) if resume else None
    if state is not None:
        _refuse_changed_options(state.get("config", {}), cfg, ckpt_path)
    init = checkpoint.load(cfg.init) if (cfg.init and not resume) else None
    mconf = (state or init or {}).get("model_config") or model_config_of(cfg, images.num_classes)
    if cfg.latent and init is not None:
        raise ValueError(f"latent: --init {cfg.init} sets the model and its space (a latent checkpoint keeps its "
                         "autoencoder); omit --latent")
    ae = latent.of_model_config(mconf)
    model = build_model(mconf).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    if init is not None:
        model.load_state_dict(init["model"])
        ema.load_state_dict(init["ema"])
    schedule = schedule_of(mconf)
    teacher = None
    if cfg.objective == "self_perceptual":
        tpath = cfg.teacher or cfg.init
        tmodel, tconf = load_model(tpath, use_ema=False)  # the raw MSE model, not its EMA (as the paper)
        if tconf["arch"] != mconf["arch"] or tconf["in_channels"] != mconf["in_channels"]:
            raise ValueError(f"teacher: {tpath} holds a {tconf['arch']} with {tconf['in_channels']} channels, "
                             f"the student is a {mconf['arch']} with {mconf['in_channels']}")
        teacher = FrozenTeacher(tmodel.to(device), cfg.layers, copy=False)

    opt = _optimizer(cfg, model, device)
    counters = {"good": torch.zeros((), dtype=torch.int64, device=device),   # optimizer steps taken
                "bad": torch.zeros((), dtype=torch.int64, device=device),    # non-finite steps skipped
                "bad_in_row": torch.zeros((), dtype=torch.int64, device=device)}
    start = 0
    if state is not None:
        model.load_state_dict(state["model"])
        ema.load_state_dict(state["ema"])
        opt.load_state_dict(state["optimizer"])
        for k, v in state.get("counters", {}).items():
            counters[k].copy_(v)
        opt.param_groups[0]["lr"] = torch.tensor(cfg.lr, device=device)  # checkpoints load to CPU
        torch.set_rng_state(state["rng"]["torch"])
        start = state["step"]

    net = model
    if cfg.compile:
        net.compile()
        if teacher is not None:
            teacher.compile()
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    x_all = data.to_model_range(train_set.images)
    x_all = (latent.encode_images(ae, x_all) if ae is not None else x_all).to(device)  # encoded once
    y_all = train_set.labels.to(device) if (mconf["num_classes"] is not None) else None
    null = null_class(mconf)
    per_rank, micro = cfg.batch_size // world, cfg.batch_size // world // cfg.grad_accum
    T = schedule.num_train_timesteps
    t_prime_dist = cfg.t_prime_distribution()
    t_prime_dist.bounds(T)
    log_path = out / "log.jsonl"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        _trim_log(log_path, start)

    def save(step: int) -> None:
        if rank != 0:
            return
        checkpoint.save({"model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
                         "counters": {k: v.cpu() for k, v in counters.items()}, "step": step,
                         "elapsed": time.time() - t0,
                         "rng": {"torch": torch.get_rng_state()}, "config": asdict(cfg), "model_config": mconf},
                        ckpt_path)

    bar = None
    if rank == 0 and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.max_steps, initial=start, desc=f"{cfg.objective} -> {out}", dynamic_ncols=True)
    loss_value, step = _last_logged_loss(log_path) if resume else None, start
    t0 = time.time() - (state.get("elapsed", 0.0) if state is not None else 0.0)  # elapsed counts across resumes
    if resume and rank == 0 and start < cfg.max_steps:
        with open(log_path, "a") as f:
            f.write(json.dumps({"step": start, "event": "resumed", "elapsed": round(time.time() - t0, 3)}) + "\n")
    # Warm-up capped at a fifth of the run: a short run must leave it.
    warm = max(1, min(int(cfg.warmup_steps), cfg.max_steps // 5))
    lr_now = opt.param_groups[0]["lr"]
    params = list(model.parameters())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    with _StopFlag() as stop, (bar if bar is not None else contextlib.nullcontext()):
        for step in range(start, cfg.max_steps):
            g = _step_generator(cfg.seed, step)
            B = cfg.batch_size
            idx = torch.randint(0, x_all.shape[0], (B,), generator=g)
            noise_all = torch.randn((B, *x_all.shape[1:]), generator=g)
            t_all = torch.randint(0, T, (B,), generator=g)
            t2_all = t_prime_dist.sample(B, T, generator=g)
            drop_all = torch.rand(B, generator=g) < cfg.label_dropout
            mine = slice(rank * per_rank, (rank + 1) * per_rank)
            total = torch.zeros((), device=device)
            lr_now.copy_(cfg.lr * torch.clamp((counters["good"] + 1).double() / warm, max=1.0))
            for k in range(cfg.grad_accum):
                sl = slice(mine.start + k * micro, mine.start + (k + 1) * micro)
                x0 = x_all[idx[sl].to(device)]
                noise, t, t2 = noise_all[sl].to(device), t_all[sl].to(device), t2_all[sl].to(device)
                labels = None
                if y_all is not None:
                    labels = torch.where(drop_all[sl].to(device), torch.full_like(t, null), y_all[idx[sl].to(device)])
                sync = k == cfg.grad_accum - 1 or world == 1
                ctx = net.no_sync() if (world > 1 and not sync) else contextlib.nullcontext()
                with ctx:
                    with autocast:  # bf16: the student and the teacher; losses accumulate in fp32
                        pred = predict(net, schedule._add_noise(x0, noise, t), t, labels).float()
                        loss = _objective(cfg, teacher, schedule, pred, x0, noise, t, t2, labels)
                    (loss / cfg.grad_accum).backward()
                total += loss.detach() / cfg.grad_accum
            # A NaN/Inf in the loss or any gradient (after DDP's all-reduce, so every rank agrees) skips
            # the whole update: the optimizer, the EMA and the warm-up counter.
            norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
            ok = torch.isfinite(norm) & torch.isfinite(total)
            opt.found_inf = (~ok).float()
            opt.step()
            opt.zero_grad(set_to_none=True)
            counters["good"] += ok
            counters["bad"] += ~ok
            counters["bad_in_row"] = (counters["bad_in_row"] + 1) * (~ok)
            ema_update(ema, model, min(cfg.ema_decay, (1 + step) / (10 + step)), ok)  # warm-up from step 0
            done = step + 1
            if done % cfg.log_every == 0 or done == cfg.max_steps:
                read = torch.stack([_all_mean(total, world).double(), counters["bad_in_row"].double(),
                                    counters["bad"].double(), lr_now.double()]).tolist()  # one sync per log line
                loss_value, bad_in_row, bad = read[0], int(read[1]), int(read[2])
                if rank == 0:
                    with open(log_path, "a") as f:
                        f.write(json.dumps({"step": done, "loss": loss_value, "lr": read[3], "bad_steps": bad,
                                            "elapsed": round(time.time() - t0, 3)}) + "\n")
                if bad_in_row > cfg.max_bad_steps:
                    save(done)
                    raise NonFiniteTraining(
                        f"loss: {bad_in_row} steps in a row up to step {done} had a NaN/Inf loss or gradient "
                        f"(more than --max-bad-steps {cfg.max_bad_steps}); each was skipped, so the weights in "
                        f"{ckpt_path} are those of the last good step. Lower --lr or check the data.")
            if bar is not None:
                bar.update(1)
                if loss_value is not None:
                    bar.set_postfix(loss=f"{loss_value:.4f}")
            signum = _agreed_stop(stop.signum, world, device)
            if done % cfg.save_every == 0 or done == cfg.max_steps or signum:
                save(done)
            if signum:
                step = done
                break
        else:
            step = cfg.max_steps
            if start == cfg.max_steps and not resume:
                save(step)
    if world > 1:
        dist.barrier()
    return {"step": step, "steps_run": step - start, "loss": loss_value, "finished": step >= cfg.max_steps,
            "interrupted": _agreed_stop(stop.signum, 1, device), "checkpoint": str(ckpt_path)}


class NonFiniteTraining(RuntimeError):
    """Raised when more than `max_bad_steps` steps in a row had a non-finite loss or gradient."""


def _last_logged_loss(path: Path) -> float | None:
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    losses = [r["loss"] for r in rows if "loss" in r]
    return losses[-1] if losses else None


def _refuse_or_clear_earlier_run(out: Path, overwrite: bool) -> None:
    """A folder holding a run is never overwritten by accident: without resume it needs `overwrite`."""
    found = [p for p in (out / "checkpoint.pt", checkpoint.previous(out / "checkpoint.pt"), out / "log.jsonl")
             if p.exists()]
    if not found:
        return
    if not overwrite:
        raise ValueError(f"out: {out} holds a run ({', '.join(p.name for p in found)}); pass --resume to continue "
                         "it or --overwrite to start over")
    for p in found:
        p.unlink()


# Options a resumed run may change: where and how long it runs and how it reports, not what it learns.
_RESUMABLE_CHANGES = {"out", "init", "max_steps", "save_every", "log_every", "max_bad_steps", "resume", "overwrite",
                      "progress", "compile", "extra"}


def _refuse_changed_options(saved: dict, cfg: TrainConfig, path: Path) -> None:
    """Resuming with other training options would silently mix two runs (e.g. a stale fine-tune reused
    under a new learning rate); name what differs instead."""
    now = asdict(cfg)
    changed = [f"{k}: checkpoint {_plain(saved[k])!r}, now {_plain(now[k])!r}" for k in saved
               if k in now and k not in _RESUMABLE_CHANGES and _plain(saved[k]) != _plain(now[k])]
    if changed:
        raise ValueError(f"resume: {path} was trained with other options ({'; '.join(changed)}); resume with the "
                         "same options, or start over (`fastperc train --overwrite`, `fastperc demo --fresh`)")


def _plain(v):
    return list(v) if isinstance(v, (tuple, list)) else v


def _optimizer(cfg: TrainConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    """Fused AdamW or SGD with a device-resident learning rate: a non-finite step is skipped on the
    device (found_inf leaves the parameters and the optimizer state untouched) and the warm-up counts
    good steps on the device, so neither needs a host sync."""
    lr = torch.tensor(cfg.lr, device=device)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                              fused=True)
        if cfg.momentum > 0:  # fused SGD leaves a new buffer uninitialised when its first step is skipped
            for p in model.parameters():
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
        return opt
    return torch.optim.AdamW(model.parameters(), lr=lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay, fused=True)


def _objective(cfg, teacher, schedule, pred, x0, noise, t, t2, labels) -> torch.Tensor:
    target = schedule.target(x0, noise, t, schedule.prediction_type)
    if cfg.objective == "mse":
        return F.mse_loss(pred, target)
    kwargs = {"class_labels": labels} if labels is not None else {}
    per_sample = self_perceptual_loss(teacher, pred, x0, noise, t, schedule, layer_weights=cfg.layer_weights,
                                      teacher_kwargs=kwargs, timesteps_prime=t2, reduction="none",
                                      feature_norm=cfg.feature_norm)
    if cfg.objective_t_range is not None:  # the objective on a band of t, plain MSE on the rest
        mse = (pred - target).square().flatten(1).mean(1)
        inside = (t >= cfg.objective_t_range[0]) & (t <= cfg.objective_t_range[1])
        per_sample = torch.where(inside, per_sample, mse)
    loss = per_sample.mean()
    if cfg.mse_weight > 0:
        loss = loss + cfg.mse_weight * F.mse_loss(pred, target)
    return loss


def _agreed_stop(signum: int, world: int, device) -> int:
    """All ranks stop at the same step when any of them got a signal."""
    if world <= 1:
        return signum
    flag = torch.tensor([signum], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag)


def _trim_log(path: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint (they will be written again)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))
