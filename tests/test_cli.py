"""The `fastperc` command: bad values exit 2 with one line, every option documented with its default,
the progress bar, `--init` filling the model options, the entry point."""
from __future__ import annotations

import argparse
import subprocess
import sys

import pytest

from fastperc.recipes import checkpoint
from fastperc.recipes.cli import build_parser, main


def test_info_reports_versions_and_auto_choice(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "cpu      auto -> cpu" in out


def test_demo_rejects_unknown_preset(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--preset", "huge"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["train", "--out", "x", "--objective", "l1"], "invalid choice"),
    (["train", "--out", "x", "--max-steps", "-3"], "expected a value >= 0"),
    (["train", "--out", "x", "--lr", "0"], "expected a value > 0"),
    (["sample", "missing.pt", "--out", "s.npz", "--n", "-1"], "expected a value > 0"),
])
def test_bad_cli_values_exit_2(args, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_help_shows_defaults_and_version_prints(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    assert "(default: 0.0002)" in text and "(default: 1000)" in text
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith("fastperc ")


def test_every_cli_option_has_help():
    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name} {a.option_strings or a.dest}" for name, p in subs.choices.items() for a in p._actions
               if not a.help and a.dest != "help"]
    assert not missing, missing


def test_the_progress_bar_never_shows_nan(tmp_path, capsys):
    assert main(["train", "--out", str(tmp_path / "r"), "--max-steps", "4", "--batch-size", "4",
                 "--channels-per-level", "8,16", "--log-every", "3"]) == 0
    err = capsys.readouterr().err
    assert "loss=" in err and "nan" not in err.lower(), err[-2000:]


def test_init_fills_the_model_options_and_refuses_explicit_conflicts(mse_run, tmp_path, capsys):
    base = ["train", "--init", str(mse_run), "--max-steps", "1", "--batch-size", "4", "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "a")]) == 0  # conditional, 8,16 from the checkpoint
    assert checkpoint.load(tmp_path / "a")["model_config"]["num_classes"] == 10
    capsys.readouterr()
    code = main(base + ["--out", str(tmp_path / "b"), "--channels-per-level", "32,64", "--prediction-type", "epsilon"])
    err = capsys.readouterr().err
    assert code == 2 and "--channels-per-level (32, 64) disagrees with" in err and "'v_prediction'" in err
    assert main(base + ["--out", str(tmp_path / "c"), "--conditional", "--channels-per-level", "8,16"]) == 0


@pytest.mark.slow
def test_module_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "fastperc", "info"], capture_output=True, text=True)
    assert r.returncode == 0 and "fastperc" in r.stdout
