"""One definition per training option: the CLI's flags, bounds and help come from TrainConfig, so the
command line and the config accept and refuse the same values."""
import re
from dataclasses import fields

import pytest

from fastperc.recipes.cli import build_parser, main
from fastperc.recipes.config import BOUNDS, TrainConfig

# A value just outside each bound, and one inside it.
OUTSIDE = {"positive": "0", "non_negative": "-1", "unit_interval": "1"}
INSIDE = {"positive": "1", "non_negative": "0", "unit_interval": "0.5"}
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
        config = model_config_of(TrainConfig(out="x", prediction_type=prediction_type), num_classes=None)
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
