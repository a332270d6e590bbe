"""`fastperc finetune`: fine-tune a pipeline's denoiser (a UNet or a transformer) with the self-perceptual
objective (its frozen copy is the teacher) or with plain MSE (the equal-step baseline), on accelerate.

accelerate holds the processes, mixed precision, gradient accumulation (`accumulate`) and the
checkpoint (`save_state` / `load_state` of the denoiser, the optimizer, the EMA weights, the step counters
and every RNG). Every draw of step k (images, flips, noise, t, t', caption dropout) comes from a generator
seeded with (seed, k) and is made for the whole global batch on every process, each taking its slice:
a resumed run repeats the uninterrupted one. A step whose loss or gradient norm is not finite is
skipped on the device (the optimizer, the EMA and the warm-up counter), as in `fastperc train`, whose
objective, timestep strata, learning-rate schedule and EMA update this loop shares
(`recipes/objective.py`).
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch import nn

from ...errors import InputError
from ...adapters.registry import family_of
from ...schedule import NoiseSchedule
from ...teacher import FrozenTeacher
from ..config import FINETUNE_RESUMABLE_OPTIONS, FinetuneConfig
from ..objective import TimestepStrata, ema_update, lr_factor, objective_loss, seed_for, warmup_length
from ..run_files import (append_log, last_logged_loss, log_step, refuse_changed_options, refuse_or_clear_earlier_run,
                         step_loop, trim_log)
from . import captioned_images, latent_cache, lora, pipeline, validation

CHECKPOINT = "checkpoint"


class Counters(nn.Module):
    """Good, skipped and skipped-in-a-row steps, on the device (no host sync); saved with the state."""

    def __init__(self):
        super().__init__()
        for name in ("good", "bad", "bad_in_row"):
            self.register_buffer(name, torch.zeros((), dtype=torch.int64))


@dataclass
class Job:
    cfg: FinetuneConfig
    accelerator: object
    pipe: object
    family: object           # families.Family: the denoiser, its conditioning and its latent layout
    denoiser: nn.Module      # the UNet or transformer, prepared by accelerate (DDP-wrapped with several processes)
    model_timestep: object   # the loss's timestep -> the one the denoiser's forward takes (Flux: / 1000)
    fixed: dict              # inputs the same every step (Flux's position ids), on the device
    trained: list            # the parameters that train: all of the denoiser's, or its LoRA weights
    ema: nn.Module | None    # the EMA denoiser, or with LoRA the EMA of the LoRA weights (lora.LoraEMA)
    teacher: FrozenTeacher | None
    opt: object
    counters: Counters
    schedule: NoiseSchedule
    strata: TimestepStrata
    t_prime: object
    found: captioned_images.CaptionedImages
    encoded: latent_cache.Encoded
    latent_shape: tuple[int, int, int]  # (C, h, w) of the VAE's latents, before any packing
    start: int
    elapsed: float
    resumed: bool

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def device(self) -> torch.device:
        return self.accelerator.device


# Cached latents and caption states stay on the device up to this size (indexed there, no host sync);
# beyond it they stay on the host and each step copies its rows.
ON_DEVICE_BYTES = 2 * 2**30


def _accelerator(cfg: FinetuneConfig):
    from datetime import timedelta

    from accelerate import Accelerator, InitProcessGroupKwargs
    # The main process encodes the data before the others go on: longer than the default collective timeout
    # for a large folder.
    return Accelerator(mixed_precision="bf16" if cfg.precision == "bf16" else "no",
                       gradient_accumulation_steps=cfg.grad_accum,
                       kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(hours=4))])


def refuse_sharding(accelerator) -> None:
    """Several processes run as DDP. accelerate's FSDP, DeepSpeed and Megatron modes shard the denoiser,
    which the EMA copy, the frozen teacher copy and the LoRA teacher here do not expect: refused with a
    clear error rather than run wrongly (a sharded teacher is `fastperc train --fsdp`'s)."""
    kind = getattr(accelerator.distributed_type, "name", str(accelerator.distributed_type))
    if kind in ("FSDP", "DEEPSPEED", "MEGATRON_LM"):
        raise InputError(f"accelerate: fastperc finetune runs several processes as DDP (accelerate launch "
                         f"--multi_gpu, or torchrun); accelerate's config asks for {kind}, which it does not support "
                         "yet: run `accelerate config` again and choose multi-GPU without it")


def checkpoint_folder(out: Path) -> Path | None:
    """The checkpoint to resume from: OUT/checkpoint, or the previous one when a save was cut between
    moving it aside and renaming the new one into place."""
    for name in (CHECKPOINT, f"{CHECKPOINT}.prev"):
        if (out / name / "state.json").is_file():
            return out / name
    return None


def build(cfg: FinetuneConfig) -> Job:
    """Validate, load the pipeline and the data, encode (or read the cache), and build the teacher, the
    EMA, the optimizer and accelerate's state, resumed from OUT/checkpoint with --resume."""
    cfg.validate()
    out = Path(cfg.out)
    accelerator = _accelerator(cfg)
    refuse_sharding(accelerator)
    world, device = accelerator.num_processes, accelerator.device
    if cfg.batch_size % (world * cfg.grad_accum):
        raise InputError(f"batch_size: expected a multiple of processes x grad_accum = {world * cfg.grad_accum}, "
                         f"got {cfg.batch_size}")
    pipe, family = pipeline.load(cfg.pretrained, device, cfg.progress)
    pipeline.check_resolution(pipe, family, cfg.resolution)
    schedule = NoiseSchedule.from_diffusers(pipe.scheduler)
    micro = cfg.batch_size // (world * cfg.grad_accum)
    # before the data is encoded: a combination of options it refuses is refused in seconds
    strata = TimestepStrata.of(cfg, schedule, micro, device, cfg.t_distribution(family.t_density))
    t_prime = cfg.t_prime_distribution()
    t_prime.bounds(schedule.num_train_timesteps)
    found = captioned_images.load(cfg.data, cfg.unconditional, cfg.strict)
    held = checkpoint_folder(out)
    resumed = cfg.resume and held is not None
    if not cfg.resume and accelerator.is_main_process:  # the cache is kept: it is valid for the same inputs
        refuse_or_clear_earlier_run(out, cfg.overwrite, [out / n for n in (CHECKPOINT, f"{CHECKPOINT}.prev",
                                    f"{CHECKPOINT}.tmp", "log.jsonl", "final", "validation")])
    accelerator.wait_for_everyone()
    with accelerator.main_process_first():  # the main process encodes; the others read its cache
        encoded = latent_cache.encoded(pipe, family, cfg.pretrained, found, cfg.resolution, cfg.random_crop,
                                       out / "cache", device, cfg.seed, is_main=accelerator.is_main_process)
    encoded = encoded.to(device if encoded.nbytes() <= ON_DEVICE_BYTES else torch.device("cpu"), device)

    model = pipeline.denoiser(pipe, family)
    adapter = family_of(model)  # its family's timestep convention, probed or not (as the teacher reads it)
    trained = lora.add_lora(model, cfg.lora_rank, family.lora_targets, cfg.seed) if cfg.lora_rank else \
        list(model.parameters())
    teacher = None
    if cfg.objective == "self_perceptual":
        if cfg.lora_rank:  # the base weights are the teacher: the same denoiser with its adapters off
            teacher = FrozenTeacher(model, cfg.layers, copy=False, adapters_off=True)
        else:  # the pretrained denoiser, frozen and pruned, before it trains
            dtype = None if cfg.teacher_precision == "same" else torch.bfloat16
            teacher = FrozenTeacher(model, cfg.layers, checkpoint=cfg.teacher_checkpoint, dtype=dtype,
                                    fp8=cfg.teacher_precision == "fp8")
        if cfg.layers is None:
            cfg = replace(cfg, layers=teacher.layers)
    if cfg.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    model.train()
    ema = None
    if cfg.ema_decay > 0:
        ema = lora.LoraEMA(trained) if cfg.lora_rank else copy.deepcopy(model).eval().requires_grad_(False)
    lr = torch.tensor(cfg.lr, device=device)
    opt = torch.optim.AdamW(trained, lr=lr, eps=cfg.adam_eps, weight_decay=cfg.weight_decay, fused=True)
    counters = Counters().to(device)
    model, opt = accelerator.prepare(model, opt)
    accelerator.register_for_checkpointing(counters)
    if ema is not None:
        accelerator.register_for_checkpointing(ema)

    start, elapsed = 0, 0.0
    if resumed:
        saved = json.loads((held / "state.json").read_text())
        refuse_changed_options(saved["config"], cfg, held / "state.json", FINETUNE_RESUMABLE_OPTIONS, "--overwrite")
        accelerator.load_state(str(held))
        start, elapsed = saved["step"], saved.get("elapsed", 0.0)
        opt.param_groups[0]["lr"] = lr  # the tensor the loop updates in place, on this device
    side = cfg.resolution // pipe.vae_scale_factor
    model_timestep = adapter.model_timestep if adapter is not None else (lambda t: t)
    fixed = family.fixed_inputs(pipe, side, encoded.empty["encoder_hidden_states"].shape[0], device)
    return Job(cfg, accelerator, pipe, family, model, model_timestep, fixed, trained, ema, teacher, opt, counters,
               schedule, strata, t_prime, found, encoded, (pipe.vae.config.latent_channels, side, side), start,
               elapsed, resumed)


def step(job: Job, k: int, warmup: int) -> torch.Tensor:
    """Optimizer step k (grad_accum micro-batches); the mean loss as a device tensor."""
    cfg, acc, device = job.cfg, job.accelerator, job.device
    B = cfg.batch_size
    g = torch.Generator(device=device).manual_seed(seed_for(cfg.seed, k))
    n = len(job.found)
    idx = torch.randint(0, n, (B,), generator=g, device=device)
    flips = torch.randint(0, 2, (B,), generator=g, device=device)
    noise_all = torch.randn((B, *job.latent_shape), generator=g, device=device)
    t_all = job.strata.draw(B, g)
    t_prime_all = job.t_prime.sample(B, generator=g, schedule=job.schedule)
    drop_all = torch.rand(B, generator=g, device=device) < cfg.caption_dropout
    crops_all = eps_all = None
    if job.encoded.latents is None:  # random crops: offsets, flips and the VAE's posterior draws, all global
        crops_all = torch.rand(B, 3, generator=g, device=device)
        eps_all = torch.randn((B, *job.latent_shape), generator=g, device=device)

    per_rank = B // acc.num_processes
    micro = per_rank // cfg.grad_accum
    first = acc.process_index * per_rank
    job.opt.param_groups[0]["lr"].copy_(cfg.lr * lr_factor(cfg, job.counters.good, warmup))
    total = torch.zeros((), device=device)
    ok = None
    for m in range(cfg.grad_accum):
        sl = slice(first + m * micro, first + (m + 1) * micro)
        rows, enc = idx[sl], job.encoded
        held = rows.to(next(iter(enc.prompts.values())).device)  # no copy while the cache is on the device
        time_ids = None
        if enc.latents is not None:
            x0 = enc.latents[held, flips[sl].to(held.device)].to(device).float()
            if enc.time_ids is not None:
                time_ids = enc.time_ids[held, flips[sl].to(held.device)].to(device)
        else:
            x0, time_ids = latent_cache.random_crops(job.pipe, job.found, rows.tolist(), cfg.resolution,
                                                     crops_all[sl], eps_all[sl])
        drop = drop_all[sl]
        cond = {k: torch.where(drop.view(-1, *[1] * (v.dim() - 1)), enc.empty[k], v[held].to(device)).float()
                for k, v in enc.prompts.items()}
        kwargs = job.family.kwargs(job.pipe, cond, time_ids, job.fixed, cfg.flux_guidance)
        # the latents and the noise in the denoiser's layout (Flux: packed tokens); the loss compares there
        x0, noise = job.family.model_input(job.pipe, x0), job.family.model_input(job.pipe, noise_all[sl])
        t, t_prime = t_all[sl], t_prime_all[sl]
        with acc.accumulate(job.denoiser):
            with acc.autocast():  # bf16: the student and the teacher; the losses accumulate in fp32
                x_t = job.schedule.add_noise(x0, noise, t, check=False)
                pred = job.denoiser(x_t, timestep=job.model_timestep(t), **kwargs).sample.float()
                loss = objective_loss(cfg, job.teacher, job.schedule, pred, x0, noise, t, t_prime, kwargs,
                                      job.strata.k)
            acc.backward(loss)  # divided by grad_accum by accelerate
            total += loss.detach() / cfg.grad_accum
            if acc.sync_gradients:
                norm = acc.clip_grad_norm_(job.denoiser.parameters(), cfg.grad_clip if cfg.grad_clip > 0 else math.inf)
                # every process skips alike: the norm is of the all-reduced gradients, the loss all-reduced
                seen = acc.reduce(total, reduction="sum") if acc.num_processes > 1 else total
                ok = torch.isfinite(norm) & torch.isfinite(seen)
                job.opt.optimizer.found_inf = (~ok).float()  # a non-finite step changes nothing (fused AdamW)
            job.opt.step()
            job.opt.zero_grad(set_to_none=True)
    if ok is None:  # accelerate's micro-batch counter fell out of step with ours: never silently
        raise RuntimeError(f"step {k}: accelerate did not sync gradients on the last of {cfg.grad_accum} micro-batches")
    c = job.counters
    c.good += ok
    c.bad += ~ok
    c.bad_in_row.copy_((c.bad_in_row + 1) * (~ok))
    if job.ema is not None:
        decay = min(cfg.ema_decay, (1 + k) / (10 + k))
        if cfg.lora_rank:
            job.ema.update(job.trained, decay, ok)
        else:
            ema_update(job.ema, acc.unwrap_model(job.denoiser), decay, ok)
    return total


def save_checkpoint(job: Job, k: int, t0: float) -> None:
    """accelerate's state and ours (step, options) into OUT/checkpoint, atomically: written beside it
    (state.json last: a folder without it is incomplete), the last one moved aside, the new one renamed
    into place, the old one removed. A save cut anywhere leaves a complete checkpoint or its predecessor
    (`checkpoint_folder` reads either)."""
    acc, out = job.accelerator, job.out
    tmp, final, prev = out / f"{CHECKPOINT}.tmp", out / CHECKPOINT, out / f"{CHECKPOINT}.prev"
    acc.wait_for_everyone()
    if acc.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    acc.wait_for_everyone()
    acc.save_state(str(tmp))
    acc.wait_for_everyone()  # every process's files are in tmp before it moves
    if acc.is_main_process:
        (tmp / "state.json").write_text(json.dumps({"step": k, "elapsed": round(time.time() - t0, 3),
                                                    "config": asdict(job.cfg)}))
        if final.exists():
            if prev.exists():  # a predecessor left by a cut save: the newer complete one is `final`
                shutil.rmtree(prev)
            final.rename(prev)
        tmp.rename(final)
        if prev.exists():
            shutil.rmtree(prev)
    acc.wait_for_everyone()


@contextlib.contextmanager
def _final_weights(job: Job):
    """The denoiser with the weights the result gets: the EMA copy when kept; with LoRA the trained model
    with the LoRA weights' EMA swapped in for the span of the block; else the trained model."""
    model = job.accelerator.unwrap_model(job.denoiser)
    if job.ema is None:
        yield model
    elif job.cfg.lora_rank:
        with job.ema.swapped_in(job.trained):
            yield model
    else:
        yield job.ema


def validation_prompts(job: Job) -> list[str]:
    """--validation-prompt, else the first two distinct captions of the data (or the empty prompt)."""
    if job.cfg.validation_prompt:
        return list(job.cfg.validation_prompt)
    distinct = list(dict.fromkeys(c for c in job.found.captions if c))
    return distinct[:2] or [""]


def validate(job: Job, k: int, log_path: Path) -> Path | None:
    """A PNG grid of the validation prompts with the weights the final pipeline gets (EMA if kept)."""
    acc = job.accelerator
    if not acc.is_main_process:
        return None
    with _final_weights(job) as model:
        image = validation.grid(job.pipe, job.family, model, validation_prompts(job), job.cfg.resolution,
                                job.cfg.validation_steps, job.cfg.validation_cfg, job.cfg.flux_guidance,
                                job.cfg.seed, job.device)
    path = validation.write(image, job.out / "validation", k)
    append_log(log_path, {"step": k, "event": "validation", "grid": str(path.relative_to(job.out))})
    return path


def finetune(cfg: FinetuneConfig) -> dict:
    """Run (or resume) one fine-tune; returns {"step", "steps_run", "loss", "finished", "interrupted",
    "pipeline", "skipped_images"}."""
    job = build(cfg)
    cfg, acc = job.cfg, job.accelerator
    log_path = job.out / "log.jsonl"
    if acc.is_main_process:
        job.out.mkdir(parents=True, exist_ok=True)
        trim_log(log_path, job.start)
        if not job.resumed:
            append_log(log_path, {"step": 0, "event": "start", "images": len(job.found),
                                  "skipped": len(job.found.skipped), "processes": acc.num_processes})
    t0 = time.time() - job.elapsed
    bar = None
    if acc.is_main_process and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.max_steps, initial=job.start, desc=f"finetune {cfg.objective}", unit="step",
                   dynamic_ncols=True)
    warmup = warmup_length(cfg)
    last_log = (time.time(), job.start)

    def log(done: int, total: torch.Tensor) -> float:
        nonlocal last_log
        loss, last_log = _log_step(job, log_path, done, total, t0, last_log)
        return loss

    def after(done: int) -> None:
        if cfg.validate_every and done % cfg.validate_every == 0 and done < cfg.max_steps:
            validate(job, done, log_path)

    with bar if bar is not None else contextlib.nullcontext():
        k, signum, loss_value = step_loop(
            start=job.start, max_steps=cfg.max_steps, log_every=cfg.log_every, save_every=cfg.save_every,
            world=acc.num_processes, device=acc.device, bar=bar,
            loss=last_logged_loss(log_path) if job.resumed else None,
            step=lambda k: step(job, k, warmup), log=log, save=lambda done: save_checkpoint(job, done, t0),
            after=after)
    final = None
    if k >= cfg.max_steps:
        if job.start < cfg.max_steps or not (job.out / "final").exists():
            validate(job, k, log_path)
            if acc.is_main_process:
                with _final_weights(job) as model:
                    if cfg.lora_rank:
                        lora.save(job.pipe, model, job.out / "final", job.family.denoiser)
                    else:
                        pipeline.write_pipeline(cfg.pretrained, model, job.out / "final", job.family.denoiser)
        final = job.out / "final"
    acc.wait_for_everyone()
    acc.end_training()
    return {"step": k, "steps_run": k - job.start, "loss": loss_value, "finished": k >= cfg.max_steps,
            "interrupted": signum, "pipeline": str(final) if final else None, "skipped_images": len(job.found.skipped)}


def _log_step(job: Job, log_path: Path, done: int, total: torch.Tensor, t0: float, last: tuple[float, int]):
    acc = job.accelerator
    mean = acc.reduce(total, reduction="mean") if acc.num_processes > 1 else total

    def save() -> Path:
        save_checkpoint(job, done, t0)
        return job.out / CHECKPOINT
    return log_step(log_path, done, mean, job.opt.param_groups[0]["lr"], job.counters.bad, job.counters.bad_in_row,
                    t0, last, write=acc.is_main_process, max_bad_steps=job.cfg.max_bad_steps, save=save)
