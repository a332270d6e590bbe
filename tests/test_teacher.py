import pytest
import torch
from torch import nn

from fastperc import FrozenTeacher
from fastperc.models import UNet

from .helpers import features_by_hooks, tiny_unet


def test_teacher_copies_freezes_and_leaves_the_callers_model_trainable():
    model = tiny_unet().train()
    teacher = FrozenTeacher(model)
    assert all(p.requires_grad for p in model.parameters()) and model.training
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.model.training
    assert teacher.model is not model


def test_teacher_without_copy_freezes_the_model_itself():
    model = tiny_unet()
    teacher = FrozenTeacher(model, copy=False)
    assert teacher.model is model and not any(p.requires_grad for p in model.parameters())


def test_teacher_stays_in_eval_mode_when_parent_trains():
    parent = nn.ModuleDict({"teacher": FrozenTeacher(tiny_unet(dropout=0.5))})
    parent.train()
    assert not parent["teacher"].model.training


@pytest.mark.parametrize("layers", [("mid_block",), ("down_blocks.0", "mid_block"), ("mid_block", "conv_in"),
                                    ("mid_block.resnets.0",), ("up_blocks.1", "down_blocks.1")])
def test_truncated_features_equal_full_forward_features(layers):
    model = tiny_unet(num_classes=3).eval()
    teacher = FrozenTeacher(model, layers=layers)
    x, t, c = torch.randn(3, 1, 8, 8), torch.randint(0, 1000, (3,)), torch.tensor([0, 2, 1])
    got = teacher(x, t, class_labels=c)
    want = features_by_hooks(model, layers, x, t, class_labels=c)
    assert len(got) == len(layers)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


def _count_calls(module: nn.Module, names):
    counts = {n: 0 for n in names}
    mods = dict(module.named_modules())
    for n in names:
        mods[n].register_forward_pre_hook(lambda m, a, n=n: counts.__setitem__(n, counts[n] + 1))
    return counts


def test_nothing_after_the_deepest_tap_runs_on_fastperc_unet():
    teacher = FrozenTeacher(tiny_unet(), layers=("mid_block",), prune=False)  # truncation, not pruning
    counts = _count_calls(teacher.model, ["mid_block", "up_blocks.0", "up_blocks.1", "conv_out"])
    teacher(torch.randn(2, 1, 8, 8), torch.tensor([3, 4]))
    assert counts == {"mid_block": 1, "up_blocks.0": 0, "up_blocks.1": 0, "conv_out": 0}
    assert teacher.truncated


def test_a_tap_nested_inside_a_stage_stops_early_but_is_not_hook_free():
    teacher = FrozenTeacher(tiny_unet(), layers=("mid_block.resnets.0",), prune=False)
    counts = _count_calls(teacher.model, ["mid_block", "up_blocks.0", "conv_out"])
    teacher(torch.randn(2, 1, 8, 8), torch.tensor([3, 4]))
    assert counts == {"mid_block": 1, "up_blocks.0": 0, "conv_out": 0}
    assert not teacher.truncated


class Chain(nn.Module):
    """An architecture fastperc has no adapter for: served by the generic hook path."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, t):
        return self.c(self.b(self.a(x) + t[:, None].float()))


def test_generic_path_stops_after_the_deepest_tap():
    teacher = FrozenTeacher(Chain(), layers=("b", "a"))
    counts = _count_calls(teacher.model, ["a", "b", "c"])
    x, t = torch.randn(2, 4), torch.tensor([1, 2])
    feats = teacher(x, t)
    assert counts == {"a": 1, "b": 1, "c": 0}
    m = teacher.model
    assert torch.allclose(feats[1], m.a(x)) and torch.allclose(feats[0], m.b(m.a(x) + t[:, None].float()))
    assert not teacher.truncated


def test_unknown_layer_lists_nearest_valid_names():
    with pytest.raises(ValueError, match=r"layers: unknown layer 'mid_blok'.*nearest valid names.*'mid_block'"):
        FrozenTeacher(UNet(), layers=("mid_blok",))


def test_container_layer_that_never_runs_is_reported():
    teacher = FrozenTeacher(tiny_unet(), layers=("up_blocks",))
    with pytest.raises(RuntimeError, match="never ran"):
        teacher(torch.randn(1, 1, 8, 8), torch.tensor([1]))


@pytest.mark.parametrize("layers, exc", [((), ValueError), (("mid_block", "mid_block"), ValueError),
                                         ((3,), ValueError)])
def test_bad_layers_argument_raises(layers, exc):
    with pytest.raises(exc, match="layers"):
        FrozenTeacher(tiny_unet(), layers=layers)


def test_non_module_model_raises_type_error():
    with pytest.raises(TypeError, match="model: expected a torch.nn.Module"):
        FrozenTeacher(lambda x: x)


def test_bf16_teacher_returns_bf16_features():
    teacher = FrozenTeacher(tiny_unet(), dtype=torch.bfloat16)
    (f,) = teacher(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]))
    assert f.dtype == torch.bfloat16 and torch.isfinite(f.float()).all()
