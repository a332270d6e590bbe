"""fastperc's small DiT: shapes, conditioning, the stage-by-stage forward a teacher truncates, bad input."""
from __future__ import annotations

import pytest
import torch

from fastperc.models import DiT


def small(**kw):
    return DiT(**{"image_size": 16, "patch_size": 4, "hidden": 32, "depth": 4, "heads": 2, **kw})


def test_output_has_the_input_shape_for_integer_and_float_timesteps(gen):
    model = small(num_classes=3, in_channels=2)
    for p in model.parameters():  # leave adaLN-Zero's all-zero start, so the output depends on everything
        torch.nn.init.normal_(p, std=0.05, generator=gen)
    x = torch.randn(3, 2, 16, 16, generator=gen)
    labels = torch.tensor([0, 2, 3])  # 3 is the null class
    y_int = model(x, torch.tensor([0, 500, 999]), class_labels=labels)
    y_float = model(x, torch.tensor([0.0, 500.0, 999.0]), class_labels=labels)
    assert y_int.shape == x.shape and torch.isfinite(y_int).all()
    torch.testing.assert_close(y_int, y_float)
    y_half = model(x, torch.tensor([0.5, 500.5, 998.5]), class_labels=labels)
    assert not torch.allclose(y_half, y_float)  # fractional timesteps are seen, not rounded


def test_adaln_zero_start_predicts_zero_and_each_block_starts_as_identity(gen):
    model = small(num_classes=3)
    x = torch.randn(2, 1, 16, 16, generator=gen)
    t = torch.tensor([10, 700])
    assert torch.equal(model(x, t), torch.zeros_like(x))
    feats, _ = model.features(x, t, keep=frozenset(model.stage_names()[:3]))
    torch.testing.assert_close(feats["blocks.0"], feats["blocks.1"])


def test_unpatchify_inverts_the_patch_layout(gen):
    """Each output pixel comes from the token of its own patch: perturbing one patch's token changes
    exactly that patch's pixels."""
    model = small()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05, generator=gen)
    x = torch.randn(1, 1, 16, 16, generator=gen)
    x2 = x.clone()
    x2[..., 4:8, 8:12] += 1.0  # patch (row 1, col 2)
    model.blocks = torch.nn.ModuleList()  # no attention: tokens stay separate
    base, moved = model(x, torch.tensor([100])), model(x2, torch.tensor([100]))
    changed = (base - moved).abs().squeeze() > 0
    assert changed[4:8, 8:12].all() and changed.sum() == 16


def test_features_stop_after_the_requested_block(gen, monkeypatch):
    model = small(num_classes=3)
    calls = []
    for i, block in enumerate(model.blocks):
        monkeypatch.setattr(block, "forward", (lambda f, i: lambda *a: (calls.append(i), f(*a))[1])(block.forward, i))
    x = torch.randn(2, 1, 16, 16, generator=gen)
    feats, final = model.features(x, torch.tensor([1, 2]), torch.tensor([0, 1]), keep=frozenset({"blocks.1"}),
                                  stop="blocks.1")
    assert final is None and calls == [0, 1] and feats["blocks.1"].shape == (2, 16, 32)


@pytest.mark.parametrize("kw, match", [
    ({"image_size": 18}, "image_size"), ({"hidden": 30}, "hidden"), ({"depth": 0}, "depth"),
    ({"num_classes": 0}, "num_classes")])
def test_bad_configuration_names_the_argument(kw, match):
    with pytest.raises(ValueError, match=match):
        small(**kw)


def test_bad_calls_name_the_argument():
    model = small()
    with pytest.raises(ValueError, match="sample: expected shape"):
        model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match="class_labels"):
        model(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]), class_labels=torch.tensor([0, 1]))


def test_frozen_teacher_truncates_the_dit_and_taps_mid_depth_by_default(gen):
    from fastperc import FrozenTeacher
    model = small(num_classes=3)
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.05, generator=gen)
    teacher = FrozenTeacher(model, layers=None)
    assert teacher.truncated and teacher.layers == ("blocks.1",)  # depth 4: block 4 // 2 - 1
    x, t, y = torch.randn(2, 1, 16, 16, generator=gen), torch.tensor([5, 600]), torch.tensor([0, 3])
    captured = {}
    handle = model.blocks[1].register_forward_hook(lambda m, a, out: captured.setdefault("f", out))
    model(x, t, class_labels=y)
    handle.remove()
    (feat,) = teacher(x, t, class_labels=y)
    assert torch.equal(feat, captured["f"])
    ran = []
    for i, block in enumerate(teacher.model.blocks):
        if block is not None:  # blocks after the tap are not even held
            block.register_forward_hook(lambda m, a, out, i=i: ran.append(i))
    teacher(x, t, class_labels=y)
    assert ran == [0, 1] and teacher.pruned[:2] == ("blocks.2", "blocks.3")
