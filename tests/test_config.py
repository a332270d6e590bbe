"""One definition per training option: the CLI's flags, bounds and help come from TrainConfig, so the
command line and the config accept and refuse the same values."""
import re
from dataclasses import fields

import pytest

from fastperc.recipes.cli import build_parser, main
from fastperc.recipes.config import (BOUNDS, MODEL_OPTIONS, RESUMABLE_OPTIONS, STUDY_OPTIONS, TrainConfig,
                                     with_model_options)

# A value just outside each bound, and one inside it.
OUTSIDE = {"positive": "0", "non_negative": "-1", "unit_interval": "1", "fraction": "0"}
INSIDE = {"positive": "1", "non_negative": "0", "unit_interval": "0.5", "fraction": "0.5"}
BOUNDED = [f for f in fields(TrainConfig) if f.metadata.get("bound")]


def train_flags() -> dict:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {a.dest: a for a in sub.choices["train"]._actions if a.dest != "help"}


def test_every_option_has_one_flag_with_help():
    flags = train_flags()
    cli_fields = {f.name for f in fields(TrainConfig) if f.metadata.get("cli")}
    assert cli_fields == set(flags), cli_fields ^ set(flags)
    assert cli_fields == {f.name for f in fields(TrainConfig)} - {"extra"}
    assert all(flags[name].help for name in cli_fields)


@pytest.mark.parametrize("f", BOUNDED, ids=lambda f: f.name)
def test_cli_and_config_refuse_the_same_bound(f, capsys):
    flag = f.metadata["flag"] or "--" + f.name.replace("_", "-")
    bound = f.metadata["bound"]
    with pytest.raises(SystemExit) as e:
        main(["train", "--out", "unused", flag, OUTSIDE[bound]])
    assert e.value.code == 2 and BOUNDS[bound][1] in capsys.readouterr().err

    elem = f.metadata["type"][0] if isinstance(f.metadata["type"], tuple) else f.metadata["type"]
    n = 2 if f.name.endswith("_range") else 1  # ranges are pairs, other lists are per layer / level
    wrap = (lambda v: (v,) * n) if isinstance(f.metadata["type"], tuple) else (lambda v: v)
    with pytest.raises(ValueError, match=re.escape(f"{f.name}: expected {BOUNDS[bound][1]}")):
        TrainConfig(out="x", **{f.name: wrap(elem(float(OUTSIDE[bound])))}).validate()
    TrainConfig(out="x", **{f.name: wrap(elem(float(INSIDE[bound])))}).validate()  # inside: accepted


def test_model_options_default_to_none_on_the_command_line():
    # None means "not given": with --init they come from the checkpoint, else from TrainConfig.
    flags = train_flags()
    for name in ("block_channels", "conditional", "prediction_type"):
        assert flags[name].default is None and "with --init: the checkpoint's" in flags[name].help


def test_config_refuses_wrong_types_naming_the_option():
    with pytest.raises(ValueError, match="max_steps: expected an integer"):
        TrainConfig(out="x", max_steps=2.5).validate()
    with pytest.raises(ValueError, match="layers: expected a sequence of str"):
        TrainConfig(out="x", layers="mid_block").validate()
    with pytest.raises(ValueError, match=r"channels: expected one of \[1, 3\]"):
        TrainConfig(out="x", channels=2).validate()
    with pytest.raises(ValueError, match="resume: --resume and --overwrite exclude each other"):
        TrainConfig(out="x", resume=True, overwrite=True).validate()


def test_the_schedule_is_stored_in_the_model_config_and_rebuilt_from_it():
    import torch

    from fastperc import NoiseSchedule
    from fastperc.recipes.models import model_config_of, schedule_of

    for prediction_type, zero_snr in (("v_prediction", True), ("epsilon", False)):
        config = model_config_of(with_model_options(TrainConfig(out="x", prediction_type=prediction_type), None),
                                 num_classes=None)
        assert config["schedule"]["kind"] == "scaled_linear"
        assert config["schedule"]["rescale_zero_terminal_snr"] is zero_snr
        rebuilt = schedule_of(config)
        want = NoiseSchedule.scaled_linear(rescale_zero_terminal_snr=zero_snr, prediction_type=prediction_type)
        assert rebuilt.prediction_type == prediction_type
        assert torch.equal(rebuilt.alphas_cumprod, want.alphas_cumprod)
    # Another table stored in a checkpoint is what sampling and training rebuild.
    cosine = schedule_of({"schedule": {"kind": "cosine", "num_train_timesteps": 50, "prediction_type": "epsilon"}})
    assert torch.equal(cosine.alphas_cumprod, NoiseSchedule.cosine(50, prediction_type="epsilon").alphas_cumprod)
    # Checkpoints from before the schedule was stored describe the same scaled-linear table.
    old = schedule_of({"prediction_type": "v_prediction", "zero_terminal_snr": True})
    assert torch.equal(old.alphas_cumprod, NoiseSchedule.scaled_linear().alphas_cumprod)
    with pytest.raises(ValueError, match="schedule: expected a kind"):
        schedule_of({"schedule": {"kind": "sigmoid"}})


def test_what_may_change_on_resume_and_vary_in_a_study_is_metadata_of_each_option():
    # where and how long a run goes and how it reports; never what it learns
    assert RESUMABLE_OPTIONS == {"out", "init", "max_steps", "save_every", "log_every", "max_bad_steps", "resume",
                                 "overwrite", "progress", "compile", "teacher_checkpoint", "fsdp", "extra"}
    # a study sets the run's folder, seed, length and teacher itself (and runs in one process)
    assert {f.name for f in fields(TrainConfig)} - STUDY_OPTIONS == {"out", "init", "teacher", "seed", "max_steps",
                                                                       "resume", "progress", "fsdp"}


def test_the_flow_schedule_defaults_to_flow_prediction_for_python_callers_too():
    assert with_model_options(TrainConfig(out="x", schedule="flow"), None).prediction_type == "flow_prediction"
    assert with_model_options(TrainConfig(out="x"), None).prediction_type == "v_prediction"
    assert with_model_options(TrainConfig(out="x", schedule="flow", prediction_type="flow_prediction"),
                              None).prediction_type == "flow_prediction"


def test_model_options_from_init_refuse_a_disagreeing_value_for_python_callers():
    held = {**MODEL_OPTIONS, "block_channels": (8, 16), "conditional": True}
    cfg = with_model_options(TrainConfig(out="x", init="ckpt", block_channels=[8, 16]), held)
    assert cfg.block_channels == (8, 16) and cfg.conditional is True and cfg.arch == "unet"
    with pytest.raises(ValueError, match=r"init: --arch 'dit' disagrees with ckpt, which holds 'unet'; "
                                         r"--channels-per-level \(32, 64\) disagrees with ckpt, which holds \(8, 16\)"):
        with_model_options(TrainConfig(out="x", init="ckpt", block_channels=(32, 64), arch="dit"), held)


def test_train_with_init_and_a_disagreeing_model_option_is_refused(mse_run, tmp_path):
    from fastperc.recipes.train import train

    from .helpers import TINY
    with pytest.raises(ValueError, match=r"init: --channels-per-level \(16, 32\) disagrees with"):
        train(TrainConfig(out=str(tmp_path / "r"), init=str(mse_run), max_steps=1, **{**TINY, "block_channels": (16, 32)}))


def test_the_default_tap_is_the_librarys_per_architecture_and_is_written_into_the_run(tmp_path, capsys):
    from fastperc.recipes import checkpoint
    dit = ["--arch", "dit", "--dit-width", "16", "--dit-depth", "4", "--batch-size", "4", "--max-steps", "1",
           "--no-progress"]
    assert main(["train", "--out", str(tmp_path / "mse"), *dit]) == 0
    assert main(["train", "--out", str(tmp_path / "sp"), "--objective", "self_perceptual", "--init",
                 str(tmp_path / "mse"), "--max-steps", "1", "--batch-size", "4", "--no-progress"]) == 0
    assert tuple(checkpoint.load(tmp_path / "sp")["config"]["layers"]) == ("blocks.1",)  # mid-depth of 4 blocks
    assert tuple(checkpoint.load(tmp_path / "mse")["config"]["layers"]) == ("blocks.1",)
