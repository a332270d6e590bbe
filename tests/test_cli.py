import subprocess
import sys

from fastperc.cli import main


def test_info_reports_versions_and_auto_choice(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "cpu      auto -> cpu" in out


def test_demo_prints_losses_and_step_times(capsys):
    assert main(["demo", "--batch-size", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "plain MSE" in out and "self-perceptual (cpu)" in out


def test_demo_rejects_non_positive_batch_size(capsys):
    assert main(["demo", "--batch-size", "0"]) == 2
    assert "--batch-size" in capsys.readouterr().err


def test_module_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "fastperc", "info"], capture_output=True, text=True)
    assert r.returncode == 0 and "fastperc" in r.stdout
