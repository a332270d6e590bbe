"""Errors keep their type: what fastperc finds wrong with its input is an InputError (a ValueError) that
the command prints as one line; an exception raised inside a teacher or a bug propagates unchanged,
with a note saying what the teacher was given."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import fastperc
from fastperc import FrozenTeacher, InputError, NoiseSchedule, self_perceptual_loss
from fastperc.recipes import checkpoint
from fastperc.recipes.cli import main

from .helpers import tiny_unet


class Raising(nn.Module):
    """A frozen teacher whose forward raises `error`."""

    def __init__(self, error: Exception):
        super().__init__()
        self.error = error
        self.block = nn.Conv2d(1, 4, 3, padding=1).requires_grad_(False)

    def forward(self, sample, timestep, class_labels=None):
        raise self.error  # before the tapped block fires (the hook path stops the forward there)


def _call(teacher, **kw):
    x0, noise = torch.randn(2, 1, 8, 8), torch.randn(2, 1, 8, 8)
    return self_perceptual_loss(teacher, torch.randn(2, 1, 8, 8), x0, noise, torch.tensor([3, 700]),
                                NoiseSchedule.scaled_linear(), layers=("block",), **kw)


def test_out_of_memory_inside_the_teacher_stays_out_of_memory():
    with pytest.raises(torch.OutOfMemoryError, match="CUDA out of memory") as e:
        _call(Raising(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")))
    assert not isinstance(e.value, ValueError)


def test_a_runtime_error_inside_the_teacher_keeps_its_type_and_gets_a_note():
    with pytest.raises(RuntimeError, match="mat1 and mat2 shapes cannot be multiplied") as e:
        _call(Raising(RuntimeError("mat1 and mat2 shapes cannot be multiplied (2x4 and 8x3)")),
              teacher_kwargs={"class_labels": torch.tensor([1, 2])})
    assert not isinstance(e.value, ValueError)
    notes = "\n".join(getattr(e.value, "__notes__", []))
    assert "raised inside the teacher Raising" in notes and "teacher_kwargs {class_labels: Tensor(2,) int64}" in notes
    assert "its forward takes (sample, timestep, class_labels=None)" in notes


def test_a_type_error_inside_the_teacher_is_not_reported_as_conditioning():
    with pytest.raises(TypeError, match="unsupported operand") as e:
        _call(Raising(TypeError("unsupported operand type(s) for +: 'Tensor' and 'str'")))
    assert "teacher_kwargs:" not in str(e.value)


def test_input_errors_are_value_errors_and_exported():
    assert issubclass(InputError, ValueError) and fastperc.InputError is InputError
    with pytest.raises(InputError, match="reduction: expected one of"):
        _call(FrozenTeacher(tiny_unet()), reduction="max")


def test_the_cli_prints_an_input_error_as_one_line_and_exits_2(tmp_path, capsys):
    assert main(["sample", str(tmp_path / "none.pt"), "--out", str(tmp_path / "s.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastperc sample: error: checkpoint:") and err.count("\n") == 1


def test_the_cli_lets_any_other_error_show_its_traceback(tmp_path, monkeypatch):
    import fastperc.recipes.train as train_mod

    def broken(cfg):
        raise RuntimeError("an internal bug")

    monkeypatch.setattr(train_mod, "train", broken)
    with pytest.raises(RuntimeError, match="an internal bug"):
        main(["train", "--out", str(tmp_path / "r"), "--max-steps", "1", "--no-progress"])


def test_a_missing_file_is_an_input_error_and_a_file_not_found_error(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        checkpoint.load(tmp_path / "nowhere.pt")
    assert isinstance(e.value, InputError)
