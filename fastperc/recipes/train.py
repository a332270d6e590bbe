"""The training loop: plain MSE or the self-perceptual objective, EMA, bf16 autocast, torch.compile,
atomic checkpoints with exact resume, DDP under torchrun, and a JSONL log.

Every random draw of step k (batch indices, noise, t, t', label dropout) comes from a generator
seeded by (seed, k) and is made for the whole global batch on every rank, each rank taking its
slice: a resumed run repeats the uninterrupted one, and N processes match one with the same batch.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from ..schedule import NoiseSchedule, TimestepDistribution
from ..teacher import FrozenTeacher, default_layers
from . import checkpoint, data, latent, sharded
from .config import MODEL_OPTIONS, RESUMABLE_OPTIONS, TrainConfig, with_model_options
from .objective import TimestepStrata, ema_update, lr_factor, warmup_length
from .objective import objective_loss as _objective  # by this name: tests replace it here
from .objective import seed_for as _seed_for
from .run_files import (append_log, last_logged_loss, log_step, refuse_changed_options, refuse_or_clear_earlier_run,
                        step_loop, trim_log)
from .models import build_model, load_model, model_config_of, model_options_of, null_class, predict, schedule_of
from ..errors import InputError

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
def _no_gradient_sync(run, last: bool):
    """Gradient accumulation without communication until the last micro-batch: DDP's no_sync(), or
    FSDP2's set_requires_gradient_sync(False) (its reduce-scatter waits for the last one)."""
    if run.world == 1:
        return contextlib.nullcontext()
    if run.cfg.fsdp:
        run.model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    return contextlib.nullcontext() if last else run.net.no_sync()


# ---- building a run --------------------------------------------------------------------------------
@dataclass
class Run:
    """What a training job holds: built once by `build_run`, advanced by `train_step`."""
    cfg: TrainConfig
    rank: int
    world: int
    device: torch.device
    model: nn.Module            # the student's parameters (checkpointed)
    net: nn.Module              # what a step calls: the model, compiled and/or DDP-wrapped
    ema: nn.Module
    teacher: FrozenTeacher | None
    opt: torch.optim.Optimizer
    schedule: NoiseSchedule
    model_config: dict
    counters: dict              # device tensors: good steps, skipped steps, skipped in a row
    x_all: torch.Tensor         # the training images (or latents), in model range, on the device
    y_all: torch.Tensor | None
    t_prime: TimestepDistribution
    strata: TimestepStrata      # which samples get the teacher, how t is drawn
    generator: torch.Generator  # on the device, reseeded from (seed, step) every step
    start: int                  # the step this attempt starts at (> 0 when resumed)
    resumed: bool
    elapsed: float              # seconds spent by earlier attempts

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def save(self, step: int, t0: float) -> None:
        if self.cfg.fsdp and self.world > 1:  # every rank gathers; rank 0 writes plain, full state dicts
            model, ema, optimizer = sharded.full_state(self.model, self.ema, self.opt)
        else:
            model, ema, optimizer = self.model.state_dict(), self.ema.state_dict(), self.opt.state_dict()
        if self.rank != 0:
            return
        checkpoint.save({"model": model, "ema": ema, "optimizer": optimizer,
                         "counters": {k: v.cpu() for k, v in self.counters.items()}, "step": step,
                         "elapsed": time.time() - t0, "rng": {"torch": torch.get_rng_state()},
                         "config": asdict(self.cfg), "model_config": self.model_config}, self.checkpoint_path)


def _training_images(cfg: TrainConfig) -> data.ImageSet:
    images = data.load(cfg.data, cfg.image_size, cfg.channels)
    if cfg.conditional and images.labels is None:
        raise InputError("conditional: the data has no labels (use class sub-folders or an .npz with 'labels')")
    if images.images.shape[1:] != (cfg.channels, cfg.image_size, cfg.image_size):
        raise InputError(f"data: images are {tuple(images.images.shape[1:])}, expected "
                         f"({cfg.channels}, {cfg.image_size}, {cfg.image_size}) (set --channels/--image-size)")
    return images


def _frozen_teacher(cfg: TrainConfig, model_config: dict, device: torch.device) -> FrozenTeacher | None:
    if cfg.objective != "self_perceptual":
        return None
    path = cfg.teacher or cfg.init
    model, teacher_config = load_model(path, use_ema=False)  # the raw MSE model, not its EMA (as the paper)
    if (teacher_config["arch"], teacher_config["in_channels"]) != (model_config["arch"], model_config["in_channels"]):
        raise InputError(f"teacher: {path} holds a {teacher_config['arch']} with {teacher_config['in_channels']} "
                         f"channels, the student is a {model_config['arch']} with {model_config['in_channels']}")
    # A pruned copy, made on the host: the device only ever holds what runs up to the tap.
    dtype = None if cfg.teacher_precision == "same" else torch.bfloat16
    return FrozenTeacher(model, cfg.layers, checkpoint=cfg.teacher_checkpoint, dtype=dtype,
                         fp8=cfg.teacher_precision == "fp8").to(device)


def build_run(cfg: TrainConfig) -> Run:
    """Validate, set up the processes, load the data, and build the model, EMA, teacher and optimizer,
    from `init` or from the checkpoint being resumed (which then also sets the model options)."""
    out = Path(cfg.out)
    resumed = cfg.resume and (out / "checkpoint.pt").exists()
    state = checkpoint.load(out / "checkpoint.pt") if resumed else None
    init = checkpoint.load(cfg.init) if (cfg.init and not resumed) else None
    source, source_name = (state, str(out / "checkpoint.pt")) if state is not None else (init, cfg.init)
    cfg = with_model_options(cfg, model_options_of(source["model_config"]) if source else None, source_name)
    cfg.validate()
    rank, world, device = _setup_distributed()
    if cfg.batch_size % (world * cfg.grad_accum):
        raise InputError(f"batch_size: expected a multiple of processes x grad_accum = {world * cfg.grad_accum}, "
                         f"got {cfg.batch_size}")
    torch.manual_seed(cfg.seed)
    images = _training_images(cfg)
    train_set, _ = images.split(min(cfg.held_out, len(images) // 10), cfg.split_seed)

    if not cfg.resume and rank == 0:
        refuse_or_clear_earlier_run(out, cfg.overwrite, (out / "checkpoint.pt",
                                                         checkpoint.previous(out / "checkpoint.pt"), out / "log.jsonl"))
    if cfg.latent and init is not None:
        raise InputError(f"latent: --init {cfg.init} sets the model and its space (a latent checkpoint keeps its "
                         "autoencoder); omit --latent")
    model_config = (state or init or {}).get("model_config") or model_config_of(cfg, images.num_classes)
    model = build_model(model_config).to(device)
    ema = copy.deepcopy(model).eval().requires_grad_(False)
    start = state or init
    if start is not None:
        model.load_state_dict(start["model"])
        ema.load_state_dict(start["ema"])
    teacher = _frozen_teacher(cfg, model_config, device)
    if cfg.layers is None:  # the teacher's tap for its architecture (the student's without one), kept in the config
        cfg = replace(cfg, layers=teacher.layers if teacher is not None else default_layers(model))
    if state is not None:
        refuse_changed_options(state.get("config", {}), cfg, out / "checkpoint.pt",
                               RESUMABLE_OPTIONS | MODEL_OPTIONS.keys(),  # the model: from the checkpoint
                               "`fastperc train --overwrite`, `fastperc demo --fresh`")
    if cfg.fsdp and world == 1:
        raise InputError("fsdp: shards over several processes; run under torchrun --nproc_per_node N (a --fsdp "
                         "checkpoint resumes in one process without --fsdp)")
    fsdp = cfg.fsdp
    if fsdp:  # the student and its EMA alike, block by block, then the teacher (pruned, then sharded)
        sharded.shard_student(model, ema)
        if teacher is not None:
            teacher.shard()
    opt = _optimizer(cfg, model, device)
    counters = {name: torch.zeros((), dtype=torch.int64, device=device) for name in ("good", "bad", "bad_in_row")}
    if state is not None:
        if fsdp or any(isinstance(k, str) for k in state["optimizer"].get("state", {})):
            sharded.load_optimizer(model, opt, state["optimizer"])  # a --fsdp checkpoint: keyed by name
        else:
            opt.load_state_dict(state["optimizer"])
        for k, v in state.get("counters", {}).items():
            counters[k].copy_(v)
        opt.param_groups[0]["lr"] = torch.tensor(cfg.lr, device=device)  # checkpoints load to CPU
        torch.set_rng_state(state["rng"]["torch"])

    net = model
    if cfg.compile:
        net.compile()
        if teacher is not None:
            teacher.compile()
    if world > 1 and not fsdp:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    ae = latent.of_model_config(model_config)
    x_all = data.to_model_range(train_set.images)
    x_all = (latent.encode_images(ae, x_all) if ae is not None else x_all).to(device)  # encoded once
    y_all = train_set.labels.to(device) if model_config["num_classes"] is not None else None
    schedule = schedule_of(model_config)
    t_prime = cfg.t_prime_distribution()
    t_prime.bounds(schedule.num_train_timesteps)
    strata = TimestepStrata.of(cfg, schedule, cfg.batch_size // (world * cfg.grad_accum), device,
                               cfg.t_distribution())
    return Run(cfg=cfg, rank=rank, world=world, device=device, model=model, net=net, ema=ema, teacher=teacher,
               opt=opt, schedule=schedule, model_config=model_config, counters=counters, x_all=x_all, y_all=y_all,
               t_prime=t_prime, strata=strata, generator=torch.Generator(device=device), start=state["step"] if state is not None else 0, resumed=resumed,
               elapsed=state.get("elapsed", 0.0) if state is not None else 0.0)


# ---- one step ----------------------------------------------------------------------------------------
def train_step(run: Run, step: int, warmup: int) -> torch.Tensor:
    """One optimizer step (with gradient accumulation); returns the mean loss as a device tensor. All
    draws of the step are made on the device from (seed, step), for the global batch; each rank takes
    its slice. A NaN/Inf in the loss or any gradient (after DDP's all-reduce, so every rank agrees)
    skips the whole update: the optimizer, the EMA and the warm-up counter. No host sync, and nothing
    made on the host and copied over."""
    cfg, device, world, schedule = run.cfg, run.device, run.world, run.schedule
    B = cfg.batch_size
    g = run.generator.manual_seed(_seed_for(cfg.seed, step))
    idx = torch.randint(0, run.x_all.shape[0], (B,), generator=g, device=device)
    noise_all = torch.randn((B, *run.x_all.shape[1:]), generator=g, device=device)
    t_all = run.strata.draw(B, g)
    t_prime_all = run.t_prime.sample(B, generator=g, schedule=schedule)
    drop_all = torch.rand(B, generator=g, device=device) < cfg.label_dropout

    per_rank = B // world
    micro = per_rank // cfg.grad_accum
    first = run.rank * per_rank
    lr = run.opt.param_groups[0]["lr"]
    lr.copy_(cfg.lr * lr_factor(cfg, run.counters["good"], warmup))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16")
    total = torch.zeros((), device=device)
    for k in range(cfg.grad_accum):
        sl = slice(first + k * micro, first + (k + 1) * micro)
        rows = idx[sl]
        x0 = run.x_all[rows]
        noise, t, t_prime = noise_all[sl], t_all[sl], t_prime_all[sl]
        labels = None
        if run.y_all is not None:
            labels = torch.where(drop_all[sl], torch.full_like(run.y_all[rows], null_class(run.model_config)),
                                 run.y_all[rows])
        last = k == cfg.grad_accum - 1
        with _no_gradient_sync(run, last):
            with autocast:  # bf16: the student and the teacher; losses accumulate in fp32
                pred = predict(run.net, schedule.add_noise(x0, noise, t, check=False), t, labels).float()
                kwargs = {"class_labels": labels} if labels is not None else {}
                loss = _objective(cfg, run.teacher, schedule, pred, x0, noise, t, t_prime, kwargs, run.strata.k)
            (loss / cfg.grad_accum).backward()
        total += loss.detach() / cfg.grad_accum

    params = list(run.model.parameters())
    norm = nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
    norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # sharded gradients: a DTensor norm
    ok = torch.isfinite(norm) & torch.isfinite(total)
    run.opt.found_inf = (~ok).float()
    run.opt.step()
    run.opt.zero_grad(set_to_none=True)
    run.counters["good"] += ok
    run.counters["bad"] += ~ok
    run.counters["bad_in_row"] = (run.counters["bad_in_row"] + 1) * (~ok)
    ema_update(run.ema, run.model, min(cfg.ema_decay, (1 + step) / (10 + step)), ok)  # warm-up from step 0
    return total


# ---- the loop ----------------------------------------------------------------------------------------
def train(cfg: TrainConfig) -> dict:
    """Run (or resume) one training job; returns {"step", "steps_run", "loss", "finished", "interrupted",
    "checkpoint"}."""
    run = build_run(cfg)
    log_path = run.out / "log.jsonl"
    if run.rank == 0:
        run.out.mkdir(parents=True, exist_ok=True)
        trim_log(log_path, run.start)
    t0 = time.time() - run.elapsed  # elapsed counts across resumes
    if run.resumed and run.rank == 0 and run.start < cfg.max_steps:
        append_log(log_path, {"step": run.start, "event": "resumed", "elapsed": round(time.time() - t0, 3)})
    bar = None
    if run.rank == 0 and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.max_steps, initial=run.start, desc=f"{cfg.objective} -> {run.out}", dynamic_ncols=True)
    warmup = warmup_length(cfg)
    last_log = (time.time(), run.start)

    def log(done: int, total: torch.Tensor) -> float:
        nonlocal last_log
        loss, last_log = _log_step(run, log_path, done, total, t0, last_log)
        return loss

    with bar if bar is not None else contextlib.nullcontext():
        step, signum, loss_value = step_loop(
            start=run.start, max_steps=cfg.max_steps, log_every=cfg.log_every, save_every=cfg.save_every,
            world=run.world, device=run.device, bar=bar,
            loss=last_logged_loss(log_path) if run.resumed else None,
            step=lambda k: train_step(run, k, warmup), log=log, save=lambda done: run.save(done, t0))
    if run.start == cfg.max_steps and not run.resumed:
        run.save(step, t0)  # nothing to run (max_steps 0, or --init at its length): still a checkpoint
    if run.world > 1:
        dist.barrier()
    return {"step": step, "steps_run": step - run.start, "loss": loss_value, "finished": step >= cfg.max_steps,
            "interrupted": signum, "checkpoint": str(run.checkpoint_path)}


def _log_step(run: Run, log_path: Path, done: int, total: torch.Tensor, t0: float,
              last: tuple[float, int]) -> tuple[float, tuple[float, int]]:
    def save() -> Path:
        run.save(done, t0)
        return run.checkpoint_path
    return log_step(log_path, done, _all_mean(total, run.world), run.opt.param_groups[0]["lr"], run.counters["bad"],
                    run.counters["bad_in_row"], t0, last, write=run.rank == 0, max_bad_steps=run.cfg.max_bad_steps,
                    save=save)


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


