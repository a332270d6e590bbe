"""The memory model of benchmarks/teacher_memory.py on the real configurations (meta device, nothing
allocated): each configuration has its model card's parameter count, and each pruned teacher holds what a
full forward enters before its tap returns (within 2%)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from fastperc import FrozenTeacher
from fastperc.teacher import cast_floating

from .test_teacher_pruning import entered_parameters

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import teacher_memory  # noqa: E402



@pytest.mark.slow
@pytest.mark.parametrize("name", ["sd15", "sdxl", "sd3", "flux"])
def test_the_real_configurations_prune_to_what_runs(name):
    spec = teacher_memory.specs()[name]
    model = teacher_memory.build_meta(spec)
    assert sum(p.numel() for p in model.parameters()) == spec.published_params
    sample, t, kw = cast_floating(spec.inputs(1), torch.float32)
    for layers in spec.taps.values():
        teacher = FrozenTeacher(model, layers)
        model_t = t / 1000 if name == "flux" else t
        entered = entered_parameters(model, teacher.layers, lambda: model(sample, timestep=model_t, **kw))
        assert abs(teacher.held_parameters - entered) <= 0.02 * entered, (layers, teacher.held_parameters, entered)


@pytest.mark.slow
def test_the_memory_table_prints_every_model_and_tap(capsys):
    assert teacher_memory.main(["--models", "sd15", "sd3"]) == 0
    out = capsys.readouterr().out
    assert out.count("| SD 1.5 UNet") == 2 and out.count("| SD3-medium") == 2
    assert "mid_block (default)" in out and "transformer_blocks.11 (default)" in out
