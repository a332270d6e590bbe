"""The FLOP floor beside the step benchmark's ratios (benchmarks/step_cases.flop_floor): counted on the meta
device, it orders the objectives as their work does."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from step_cases import flop_floor  # noqa: E402


@pytest.mark.slow
def test_the_flop_floor_orders_the_objectives_by_their_work():
    f = {o: flop_floor(o, "default", 8) for o in ("mse", "naive", "trick", "fastperc", "checkpointed",
                                                  "fastperc-quarter", "fastperc-compiled")}
    assert f["mse"] > 0
    assert f["fastperc"] == f["trick"] == f["fastperc-compiled"]  # the same matmuls and convolutions
    assert f["naive"] > f["checkpointed"] > f["fastperc"] > f["fastperc-quarter"] > f["mse"]
    # the truncated teacher runs two forwards (real, fake) and one input-gradient backward of the encoder:
    # less than the student's forward + backward again
    assert 1.1 < f["fastperc"] / f["mse"] < 1.5


@pytest.mark.slow
def test_the_sd3_medium_floors_and_the_fp8_teacher_count_fp8_matmuls_at_half():
    f = {o: flop_floor(o, "sd3-512", 8) for o in ("mse", "fastperc-bf16", "fastperc-fp8")}
    # SD3-medium at 512 px, batch 8, tapped at transformer_blocks.11: about 1.52x MSE with a bf16 teacher
    # and 1.31x with FP8 Linear layers (most of the teacher's work is Linear; attention stays bf16).
    assert 1.50 < f["fastperc-bf16"] / f["mse"] < 1.54
    assert 1.28 < f["fastperc-fp8"] / f["mse"] < 1.33


@pytest.mark.slow
def test_the_cheaper_forms_order_by_their_work_and_a_bf16_teacher_does_the_same_work():
    f = {o: flop_floor(o, "default", 8) for o in ("mse", "4tap", "4tap-half", "4tap-quarter", "3tap", "4tap-bf16")}
    # a share of the batch: the teacher's work scales with it; 3 taps: the teacher stops before the midblock
    assert f["4tap"] > f["4tap-half"] > f["4tap-quarter"] > f["mse"]
    assert f["4tap"] > f["3tap"] > f["mse"]
    assert f["4tap-bf16"] == f["4tap"]  # the same work in another precision: the floor counts bf16-equivalent
