"""The loss makes no host sync by default: a GPU's launch queue never waits for the host inside it."""
from __future__ import annotations

import pytest
import torch

from fastperc import FrozenTeacher, NoiseSchedule, SelfPerceptualLoss, self_perceptual_loss
from fastperc.models import UNet

from .helpers import HostSyncAlarm


def default_unet_call(device="cpu", **kw):
    torch.manual_seed(0)
    model = UNet(num_classes=10).to(device)
    teacher, schedule = FrozenTeacher(model), NoiseSchedule.scaled_linear()
    x0 = torch.randn(4, 1, 32, 32, device=device)
    noise = torch.randn_like(x0)
    t = torch.randint(0, 1000, (4,), device=device)
    labels = torch.randint(0, 10, (4,), device=device)
    v = model(schedule.add_noise(x0, noise, t), t, class_labels=labels)
    return lambda: self_perceptual_loss(teacher, v, x0, noise, t, schedule, teacher_kwargs={"class_labels": labels},
                                        **kw)


@pytest.mark.parametrize("t_prime", ["drawn", "given"])
def test_loss_and_backward_on_the_default_unet_make_no_host_sync(t_prime):
    kw = {"timesteps_prime": torch.randint(0, 1000, (4,))} if t_prime == "given" else {}
    call = default_unet_call(**kw)
    with HostSyncAlarm() as alarm:
        loss = call()
        loss.backward()
    assert alarm.hits == [], alarm.hits


def test_module_form_makes_no_host_sync():
    criterion = SelfPerceptualLoss(UNet())
    x0, noise, t = torch.randn(2, 1, 32, 32), torch.randn(2, 1, 32, 32), torch.randint(0, 1000, (2,))
    with HostSyncAlarm() as alarm:
        criterion(torch.randn(2, 1, 32, 32), x0, noise, t)
    assert alarm.hits == [], alarm.hits


def test_check_values_reads_values_on_the_host():
    """The counter sees syncs (the test above could not pass by seeing nothing)."""
    call = default_unet_call(check_values=True)
    with HostSyncAlarm() as alarm:
        call()
    assert alarm.hits.count("aten._local_scalar_dense.default") >= 4  # x0, noise finite; t min, max


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA sync debug mode needs a GPU")
def test_loss_runs_under_cuda_sync_debug_mode_error():
    call = default_unet_call("cuda")
    call()  # warm-up: first calls may initialise tables
    torch.cuda.set_sync_debug_mode("error")
    try:
        call().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_training_steps_add_no_host_sync(tmp_path):
    """Only logging steps read values (one read of the loss and counters); the steps between are sync-free."""
    from fastperc.recipes.train import TrainConfig, train
    tiny = dict(conditional=True, block_channels=(8, 16), batch_size=4, save_every=100, log_every=100, progress=False)
    train(TrainConfig(out=str(tmp_path / "mse"), max_steps=1, **tiny))
    counts = []
    for n in (2, 6):
        with HostSyncAlarm() as alarm:
            train(TrainConfig(out=str(tmp_path / f"sp{n}"), objective="self_perceptual", init=str(tmp_path / "mse"),
                              max_steps=n, **tiny))
        counts.append(len(alarm.hits))
    assert counts[0] == counts[1], f"4 more steps added {counts[1] - counts[0]} host syncs"


def test_nothing_in_a_training_step_is_made_on_the_host_and_copied_over():
    """Static: every tensor train_step creates is created on the device (no `.to(...)` of a draw, no
    host generator): on a GPU a host copy per step is a stall per step."""
    import ast
    import inspect
    import textwrap

    from fastperc.recipes import train as train_mod
    tree = ast.parse(textwrap.dedent(inspect.getsource(train_mod.train_step)))
    makers = {"randint", "randn", "rand", "zeros", "ones", "full", "arange", "tensor", "empty", "randperm"}
    bad = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        name, owner = node.func.attr, node.func.value
        if name == "to":
            bad.append(ast.unparse(node))
        if isinstance(owner, ast.Name) and owner.id == "torch" and (name in makers or name == "Generator") \
                and "device" not in {k.arg for k in node.keywords}:
            bad.append(ast.unparse(node))
    assert not bad, bad
    assert "strata.draw" in ast.unparse(tree) and "generator=g, device=device" in ast.unparse(tree)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA sync debug mode needs a GPU")
def test_training_steps_run_under_cuda_sync_debug_mode_error(tmp_path):
    import numpy as np

    from fastperc.recipes.train import TrainConfig, build_run, train, train_step
    data = tmp_path / "digits.npz"  # an .npz: the GPU check's machine has torch and the test tools only
    rng = np.random.default_rng(0)
    np.savez(data, images=rng.integers(0, 256, (64, 32, 32), dtype=np.uint8), labels=np.arange(64) % 10)
    tiny = dict(conditional=True, block_channels=(8, 16), batch_size=8, save_every=100, log_every=100, progress=False,
                data=str(data), held_out=8)
    train(TrainConfig(out=str(tmp_path / "mse"), max_steps=1, **tiny))
    run = build_run(TrainConfig(out=str(tmp_path / "sp"), objective="self_perceptual", init=str(tmp_path / "mse"),
                                objective_t_range=(0, 499), max_steps=10, **tiny))
    train_step(run, 0, 5)  # warm-up: first calls initialise tables and kernels
    torch.cuda.set_sync_debug_mode("error")
    try:
        for step in range(1, 6):
            train_step(run, step, 5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
