"""benchmarks/gpu_check.sh proves its own logic on CPU (--dry-run): every stage runs, writes its log to
the output folder and a summary row; bad options are refused."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def run(*args, out: Path, timeout=900):
    env = {**os.environ, "GPU_CHECK_OUT": str(out), "PYTHON": sys.executable}
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


@pytest.mark.slow
def test_dry_run_runs_every_stage_in_rank_order_and_leaves_its_logs(tmp_path):
    r = run("--dry-run", "--step", "--scale", "--budget", "100000", out=tmp_path, timeout=2400)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    summary = (tmp_path / "summary.md").read_text()
    rows = re.findall(r"^\| (\w+) \| (\d+)", summary, flags=re.M)
    assert rows == [(s, "0") for s in ("env", "build", "info", "parity", "step_sd", "step_sd3", "step_compiled",
                                       "op_table", "scale_table")], summary
    assert "| pruned + checkpoint |" in (tmp_path / "scale_table.log").read_text()
    assert "every stage that ran passed" in summary
    assert re.search(r"\d+ passed", (tmp_path / "parity.log").read_text())
    assert "| feature_mse | cpu | fp32 |" in (tmp_path / "op_table.log").read_text()
    step_log = (tmp_path / "step_sd.log").read_text()
    assert "| fastperc | fp32 |" in step_log and "| trick | bf16 |" in step_log, step_log[-2000:]
    sd3_log = (tmp_path / "step_sd3.log").read_text()
    assert re.search(r"\| fastperc-fp8 \| bf16 \| [\d.]+ \| [\d.]+ \| [\d.]+ \| 1\.\d\d \|", sd3_log), sd3_log[-2000:]
    compiled_log = (tmp_path / "step_compiled.log").read_text()
    assert re.search(r"\| fastperc-compiled \| fp32 \| [\d.]+ \| [\d.]+ \| [\d.]+ \|", compiled_log), compiled_log[-2000:]
    assert "auto -> cpu" in (tmp_path / "info.log").read_text()


def test_a_failing_stage_is_recorded_and_the_later_stages_still_run(tmp_path):
    """As on a GPU whose CUDA build fails: the script goes on and exits non-zero at the end. A stand-in
    python answers every stage at once, so only the script's own logic runs."""
    stand_in = tmp_path / "python"
    stand_in.write_text('#!/bin/sh\n[ "$2" = "fastperc.info" ] && exit 7\necho "$@"\n')
    stand_in.chmod(0o755)
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path / "out"), "PYTHON": str(stand_in)}
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--step"], capture_output=True, text=True, env=env,
                       cwd=ROOT, timeout=120)
    assert r.returncode == 1, r.stdout[-3000:]
    rows = dict(re.findall(r"^\| (\w+) \| (\d+)", (tmp_path / "out" / "summary.md").read_text(), flags=re.M))
    assert rows == {"env": "0", "build": "0", "info": "7", "parity": "0", "op_table": "0", "step_sd": "0",
                    "step_sd3": "0", "step_compiled": "0"}
    assert "tests/test_gpu_parity.py tests/test_fp8_teacher.py" in (tmp_path / "out" / "parity.log").read_text()


def test_the_gpu_parity_stage_runs_the_fp8_tests_cuda_cases_the_compiled_one_included(tmp_path):
    r = run("--help", out=tmp_path, timeout=60)
    assert r.returncode == 0 and "--budget S" in r.stdout and "set -uo" not in r.stdout
    script = SCRIPT.read_text()
    gpu_parity = next(line for line in script.splitlines() if line.strip().startswith("parity)") and "-k cuda" in line)
    assert "tests/test_fp8_teacher.py -k cuda" in gpu_parity and "not slow" not in gpu_parity


def test_a_stage_that_would_end_past_the_budget_is_skipped_and_said_so(tmp_path):
    stand_in = tmp_path / "python"
    stand_in.write_text('#!/bin/sh\necho "$@"\n')
    stand_in.chmod(0o755)
    env = {**os.environ, "GPU_CHECK_OUT": str(tmp_path / "out"), "PYTHON": str(stand_in)}
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--stages", "step_compiled,env", "--budget", "100"],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:]
    summary = (tmp_path / "out" / "summary.md").read_text()
    # rank order (env first), and the 300 s compiled stage does not fit 100 s
    rows = re.findall(r"^\| (\w+) \| ([^|]+?) \|", summary, flags=re.M)[1:]  # below the header
    assert rows == [("env", "0"), ("step_compiled", "skipped (budget)")]
    assert "would end past the 100s budget" in r.stdout
    r = subprocess.run(["bash", str(SCRIPT), "--dry-run", "--stages", "env", "--step"], capture_output=True,
                       text=True, env=env, cwd=ROOT, timeout=120)
    rows = re.findall(r"^\| (\w+) \| ([^|]+?) \|", (tmp_path / "out" / "summary.md").read_text(), flags=re.M)[1:]
    assert rows == [("env", "0")]  # --stages: exactly these


@pytest.mark.parametrize("args, message", [(("--fast",), "unknown option '--fast'"),
                                           (("--stages", "env,fast"), "unknown stage 'fast'"),
                                           (("--budget", "ten"), "--budget expects whole seconds, got 'ten'"),
                                           (("--budget",), "--budget and --stages need a value")])
def test_unknown_options_stages_and_bad_budgets_are_refused(tmp_path, args, message):
    r = run(*args, out=tmp_path, timeout=60)
    assert r.returncode == 2 and message in r.stderr, r.stderr
