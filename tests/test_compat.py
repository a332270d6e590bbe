"""The supported diffusers range, tested at both ends: the newest in the main environment, the oldest (the
floor in pyproject.toml) in a second one built by `make test-compat`."""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def floor_in_pyproject() -> str:
    return re.search(r'"diffusers>=([\d.]+),<1\.0"', (ROOT / "pyproject.toml").read_text()).group(1)


def test_the_diffusers_floor_is_the_same_in_pyproject_the_makefile_and_the_readme():
    floor = floor_in_pyproject()
    assert f"DIFFUSERS_OLDEST ?= diffusers=={floor}\n" in (ROOT / "Makefile").read_text()
    assert f"diffusers {floor} (the oldest supported" in (ROOT / "README.md").read_text()


@pytest.mark.slow
def test_the_oldest_supported_diffusers_passes_the_teacher_adapter_and_flow_tests():
    r = subprocess.run(["make", "test-compat"], cwd=ROOT, capture_output=True, text=True, timeout=1800)
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-6000:]
    assert f"compat environment: diffusers {floor_in_pyproject()} " in out, out[-3000:]
    summary = [line for line in out.splitlines() if re.search(r"\d+ passed", line)]
    assert summary and "failed" not in summary[-1] and "error" not in summary[-1], out[-3000:]
