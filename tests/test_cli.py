import subprocess
import sys

from fastperc.recipes.cli import main


def test_info_reports_versions_and_auto_choice(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "torch" in out and "cpu      auto -> cpu" in out


def test_demo_rejects_unknown_preset(capsys):
    import pytest
    with pytest.raises(SystemExit) as e:
        main(["demo", "--preset", "huge"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_module_entry_point_runs():
    r = subprocess.run([sys.executable, "-m", "fastperc", "info"], capture_output=True, text=True)
    assert r.returncode == 0 and "fastperc" in r.stdout
