"""Every bad argument gets a ValueError/TypeError that names it."""
import pytest
import torch

from fastperc import FrozenTeacher, NoiseSchedule, SelfPerceptualLoss, self_perceptual_loss
from fastperc.ops import feature_mse, renoise

from .helpers import tiny_unet

S = NoiseSchedule.scaled_linear()
TEACHER = FrozenTeacher(tiny_unet())


def call(**over):
    args = dict(teacher=TEACHER, model_output=torch.randn(2, 1, 8, 8), x0=torch.randn(2, 1, 8, 8),
                noise=torch.randn(2, 1, 8, 8), timesteps=torch.tensor([1, 2]), schedule=S)
    kw = {k: over.pop(k) for k in list(over) if k not in args}
    args.update(over)
    return self_perceptual_loss(**args, **kw)


def nan_x0():
    x = torch.randn(2, 1, 8, 8)
    x[1, 0, 3, 3] = float("nan")
    return x


@pytest.mark.parametrize("over, exc, match", [
    ({"x0": torch.randn(2, 1, 8, 4)}, ValueError, r"x0: expected shape \(2, 1, 8, 8\)"),
    ({"noise": torch.randn(3, 1, 8, 8)}, ValueError, "noise: expected shape"),
    ({"x0": torch.randn(2, 1, 8, 8, dtype=torch.float64)}, TypeError,
     r"noise: expected dtype torch.float64 \(the dtype of x0\)"),
    ({"x0": torch.ones(2, 1, 8, 8, dtype=torch.long)}, TypeError, "x0: expected a floating dtype"),
    ({"noise": None}, TypeError, "noise: expected a torch.Tensor"),
    ({"model_output": torch.ones(2, 1, 8, 8, dtype=torch.long)}, TypeError, "model_output: expected a floating dtype"),
    ({"model_output": [1.0]}, TypeError, "model_output: expected a torch.Tensor"),
    ({"x0": torch.randn(2, 1, 8, 8, device="meta")}, ValueError, "x0: expected device cpu"),
    ({"timesteps": torch.tensor([1, 1000]), "check_values": True}, ValueError,
     r"timesteps: expected values in \[0, 999\], got min 1, max 1000"),
    ({"timesteps": torch.tensor([-1, 3]), "check_values": True}, ValueError, "timesteps: expected values"),
    # Without check_values the range is a device-side assert: no host sync, the same message.
    ({"timesteps": torch.tensor([1, 1000])}, RuntimeError, r"timesteps: expected values in \[0, 999\]"),
    ({"timesteps_prime": torch.tensor([-5, 10])}, RuntimeError, r"timesteps_prime: expected values in \[0, 999\]"),
    ({"timesteps": torch.tensor([1, 2, 3])}, ValueError, r"timesteps: expected shape \(2,\)"),
    ({"timesteps": torch.tensor([[1, 2]])}, ValueError, "timesteps: expected shape"),
    ({"timesteps": torch.tensor([1.0, 2.0])}, TypeError, "timesteps: expected an integer dtype"),
    ({"timesteps_prime": torch.tensor([5, 1000]), "check_values": True}, ValueError, "timesteps_prime: expected values"),
    ({"x0": nan_x0(), "check_values": True}, ValueError, "x0: expected finite values, got 1 NaN"),
    ({"layers": ("mid_blok",), "teacher": tiny_unet().requires_grad_(False)}, ValueError,
     "layers: unknown layer 'mid_blok'"),
    ({"teacher": tiny_unet()}, ValueError, "teacher: expected a frozen network, got a UNet whose parameters require "
                                           "grad .* is it the student\\? Pass fastperc.FrozenTeacher"),
    ({"model_output": torch.randn(0, 1, 8, 8), "x0": torch.randn(0, 1, 8, 8), "noise": torch.randn(0, 1, 8, 8),
      "timesteps": torch.zeros(0, dtype=torch.long)}, ValueError, "model_output: expected at least one sample"),
    ({"layer_weights": [-1.0]}, ValueError, r"layer_weights: expected finite values >= 0"),
    ({"layer_weights": [float("inf")]}, ValueError, r"layer_weights: expected finite values >= 0"),
    ({"layers": ("conv_in",)}, ValueError, "layers: the FrozenTeacher taps"),
    ({"layer_weights": [1.0, 2.0]}, ValueError, "layer_weights: expected 1 values"),
    ({"prediction_type": "eps"}, ValueError, "prediction_type: expected one of"),
    ({"reduction": "avg"}, ValueError, "reduction: expected one of"),
    ({"backend": "opencl"}, ValueError, "backend: expected one of"),
    ({"teacher": "unet"}, TypeError, "teacher: expected a FrozenTeacher or a torch.nn.Module"),
    ({"schedule": None}, TypeError, r"schedule: expected a fastperc.NoiseSchedule or a diffusers scheduler .*"
                                    r"NoiseSchedule.from_diffusers"),
    ({"teacher_kwargs": [1]}, TypeError, "teacher_kwargs: expected a dict"),
    ({"prediction_type": "epsilon", "timesteps": torch.tensor([999, 3])}, ValueError, "prediction_type: 'epsilon'"),
])
def test_self_perceptual_loss_rejects(over, exc, match):
    with pytest.raises(exc, match=match):
        call(**over)


def test_nan_input_without_check_values_gives_a_nan_loss_not_a_silent_number():
    assert torch.isnan(call(x0=nan_x0()))


def test_unavailable_explicit_backend_is_a_clear_error():
    with pytest.raises(RuntimeError, match="backend: 'cuda' is not available"):
        call(backend="cuda")


def test_module_rejects_bad_options():
    with pytest.raises(ValueError, match="reduction"):
        SelfPerceptualLoss(tiny_unet(), reduction="max")
    with pytest.raises(ValueError, match="layer_weights"):
        SelfPerceptualLoss(tiny_unet(), layer_weights=[1.0, 1.0])
    with pytest.raises(TypeError, match="schedule"):
        SelfPerceptualLoss(tiny_unet(), schedule="linear")


@pytest.mark.parametrize("args, exc, match", [
    (([torch.randn(2, 3)], [torch.randn(2, 4)]), ValueError, r"target_feats\[0\]: expected shape \(2, 3\)"),
    (([torch.randn(2, 3)], [torch.randn(2, 3), torch.randn(2, 3)]), ValueError, "target_feats: expected 1 tensors"),
    ((torch.randn(2, 3), [torch.randn(2, 3)]), TypeError, "pred_feats: expected a non-empty list"),
    (([], []), TypeError, "pred_feats: expected a non-empty list"),
    (([torch.randn(2, 3), torch.randn(3, 3)], [torch.randn(2, 3), torch.randn(3, 3)]), ValueError,
     r"pred_feats\[1\]: expected batch size 2"),
    (([torch.randn(2, 3)], [torch.randn(2, 3, dtype=torch.float64)]), TypeError, "expected dtype torch.float32"),
    (([torch.randn(2, 3)], [torch.randn(2, 3)], [1.0, 2.0]), ValueError, "weights: expected 1 values"),
    (([torch.randn(2, 3)], [torch.randn(2, 3)], [float("nan")]), ValueError, "weights: expected finite"),
    (([torch.randn(2, 3)], [torch.randn(2, 3)], None, "max"), ValueError, "reduction: expected one of"),
    (([torch.ones(2, 3, dtype=torch.long)], [torch.ones(2, 3, dtype=torch.long)]), TypeError, "floating dtype"),
])
def test_feature_mse_rejects(args, exc, match):
    with pytest.raises(exc, match=match):
        feature_mse(*args)


def test_renoise_rejects_wrong_coefficient_shape_and_mismatched_images():
    x = torch.randn(2, 1, 4, 4)
    c = torch.ones(2)
    with pytest.raises(ValueError, match=r"b: expected shape \(2,\)"):
        renoise(x, x, x, x, c, torch.ones(3), c, c)
    with pytest.raises(ValueError, match="noise: expected shape"):
        renoise(x, x, x, torch.randn(2, 1, 4, 5), c, c, c, c)
