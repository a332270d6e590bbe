"""What a training run keeps beside its weights, for `fastperc train` and `fastperc finetune` alike: the
JSONL log (appended, trimmed back to the checkpoint on resume, its last loss), the guard that a folder
holding a run is not overwritten by accident, the refusal to resume with other options, and the stop
signal (SIGINT / SIGTERM: a flag read at the end of a step, agreed by every process)."""
from __future__ import annotations

import json
import shutil
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import InputError


class NonFiniteTraining(InputError, RuntimeError):
    """Raised when more than `max_bad_steps` steps in a row had a non-finite loss or gradient: the
    options (most often the learning rate) or the data made the run diverge, which the user fixes."""


def append_log(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def log_step(path: Path, step: int, loss: torch.Tensor, lr: torch.Tensor, bad: torch.Tensor, bad_in_row: torch.Tensor,
             t0: float, last: tuple[float, int], *, write: bool, max_bad_steps: int,
             save: Callable[[], Path]) -> tuple[float, tuple[float, int]]:
    """One log line for `step` (a single host read of the device values: the mean loss, the learning rate,
    the skipped steps so far and in a row), with the steps per second since `last` = (time, step);
    `write` on one process only. After more than `max_bad_steps` skipped steps in a row, `save()` saves
    the last good weights (returning where) and NonFiniteTraining is raised. Returns (loss, (now, step))."""
    read = torch.stack([loss.double(), lr.double(), bad.double(), bad_in_row.double()]).tolist()
    now = time.time()
    if write:
        append_log(path, {"step": step, "loss": read[0], "lr": read[1], "bad_steps": int(read[2]),
                          "steps_per_second": round((step - last[1]) / max(now - last[0], 1e-9), 4),
                          "elapsed": round(now - t0, 3)})
    if int(read[3]) > max_bad_steps:
        where = save()
        raise NonFiniteTraining(
            f"loss: {int(read[3])} steps in a row up to step {step} had a NaN/Inf loss or gradient (more than "
            f"--max-bad-steps {max_bad_steps}); each was skipped, so the weights in {where} are those of the last "
            "good step. Lower --lr or check the data.")
    return read[0], (now, step)


def trim_log(path: Path, step: int) -> None:
    """On resume, drop log lines past the checkpoint (they will be written again)."""
    if not path.exists():
        return
    keep = [ln for ln in path.read_text().splitlines() if ln.strip() and json.loads(ln)["step"] <= step]
    path.write_text("".join(ln + "\n" for ln in keep))


def last_logged_loss(path: Path) -> float | None:
    rows = [json.loads(ln) for ln in path.read_text().splitlines() if ln.strip()] if path.exists() else []
    losses = [r["loss"] for r in rows if "loss" in r]
    return losses[-1] if losses else None


def refuse_or_clear_earlier_run(out: Path, overwrite: bool, held: Iterable[Path]) -> None:
    """A folder holding a run (any of `held` exists) is never overwritten by accident: without resume it
    needs `overwrite`, which removes them."""
    found = [p for p in held if p.exists()]
    if not found:
        return
    if not overwrite:
        raise InputError(f"out: {out} holds a run ({', '.join(p.name for p in found)}); pass --resume to continue "
                         "it or --overwrite to start over")
    for p in found:
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def plain(v):
    """A config value as JSON gives it back (tuples as lists), for comparing saved and current options."""
    return list(v) if isinstance(v, (tuple, list)) else v


def refuse_changed_options(saved: dict, cfg, path: Path, may_change: Iterable[str], start_over: str) -> None:
    """Resuming with other training options would silently mix two runs (e.g. a stale fine-tune reused
    under a new learning rate); name what differs instead. `may_change`: the options a resume may change."""
    now, exempt = asdict(cfg), set(may_change)
    changed = [f"{k}: checkpoint {plain(saved[k])!r}, now {plain(now[k])!r}" for k in saved
               if k in now and k not in exempt and plain(saved[k]) != plain(now[k])]
    if changed:
        raise InputError(f"resume: {path} was trained with other options ({'; '.join(changed)}); resume with the "
                         f"same options, or start over ({start_over})")


class StopFlag:
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


def step_loop(*, start: int, max_steps: int, log_every: int, save_every: int, world: int, device, bar,
              loss: float | None, step: Callable[[int], torch.Tensor], log: Callable[[int, torch.Tensor], float],
              save: Callable[[int], None], after: Callable[[int], None] | None = None
              ) -> tuple[int, int, float | None]:
    """The steps start .. max_steps - 1 of a training loop: `step(k)` runs step k and gives its mean loss on
    the device; `log(done, loss)` writes a log line every `log_every` steps and at the last one (the only
    host reads); the progress bar follows with the last logged loss; SIGINT / SIGTERM stop the loop at
    the end of a step (one process: on its own flag; several: agreed on logging steps only, when they
    read the device anyway, so no step waits on the host); `save(done)` writes a checkpoint every
    `save_every` steps, at the last step and on a signal; `after(done)` runs after each step's save unless
    it stops. Returns (the step reached, the signal or 0, the last logged loss)."""
    k, signum = start, 0
    with StopFlag() as stop:
        for k in range(start, max_steps):
            total = step(k)
            done = k + 1
            logged = done % log_every == 0 or done == max_steps
            if logged:
                loss = log(done, total)
            if bar is not None:
                bar.update(1)
                if loss is not None:
                    bar.set_postfix(loss=f"{loss:.4f}")
            if world == 1:
                signum = stop.signum
            elif logged:
                signum = agreed_stop(stop.signum, world, device)
            if done % save_every == 0 or done == max_steps or signum:
                save(done)
            if signum:
                return done, signum, loss
            if after is not None:
                after(done)
        else:
            k = max_steps
    return k, signum, loss


def agreed_stop(signum: int, world: int, device) -> int:
    """All ranks stop at the same step when any of them got a signal (a host read: logging steps only)."""
    flag = torch.tensor([signum], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return int(flag)
