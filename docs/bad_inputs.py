"""Regenerates the table in docs/BAD_INPUTS.md: `PYTHONPATH=. python docs/bad_inputs.py`."""
import warnings

import torch

import fastperc
from diffusers import DDPMScheduler
from fastperc import FrozenTeacher, NoiseSchedule, SelfPerceptualLoss, self_perceptual_loss
from fastperc.models import UNet
from tests.helpers import tiny_unet
from tests.test_diffusers import cond_unet
warnings.simplefilter("ignore")
S = NoiseSchedule.scaled_linear()
T = FrozenTeacher(tiny_unet())
C = FrozenTeacher(cond_unet())
def call(**over):
    args = dict(teacher=T, model_output=torch.randn(2, 1, 8, 8), x0=torch.randn(2, 1, 8, 8),
                noise=torch.randn(2, 1, 8, 8), timesteps=torch.tensor([1, 2]), schedule=S)
    args.update(over)
    return self_perceptual_loss(**args)
def ccall(**over):
    args = dict(teacher=C, model_output=torch.randn(2, 4, 8, 8), x0=torch.randn(2, 4, 8, 8),
                noise=torch.randn(2, 4, 8, 8), timesteps=torch.tensor([1, 2]), schedule=S)
    args.update(over)
    return self_perceptual_loss(**args)
nan = torch.randn(2, 1, 8, 8); nan[0, 0, 0, 0] = float("nan")
cases = [
 ("the student (trainable) passed as `teacher`", lambda: call(teacher=tiny_unet())),
 ("`schedule=None`", lambda: call(schedule=None)),
 ("`x0` of another shape", lambda: call(x0=torch.randn(2, 1, 8, 4))),
 ("`noise` in float64, `x0` in float32", lambda: call(noise=torch.randn(2, 1, 8, 8, dtype=torch.float64))),
 ("an empty batch", lambda: call(model_output=torch.randn(0, 1, 8, 8), x0=torch.randn(0, 1, 8, 8), noise=torch.randn(0, 1, 8, 8), timesteps=torch.zeros(0, dtype=torch.long))),
 ("float `timesteps`", lambda: call(timesteps=torch.tensor([1.0, 2.0]))),
 ("`timesteps` out of range (default: device-side check)", lambda: call(timesteps=torch.tensor([1, 1000]))),
 ("`timesteps` out of range with `check_values=True`", lambda: call(timesteps=torch.tensor([1, 1000]), check_values=True)),
 ("NaN in `x0` with `check_values=True`", lambda: call(x0=nan, check_values=True)),
 ("`layer_weights=[-1]`", lambda: call(layer_weights=[-1.0])),
 ("`layer_weights` of the wrong length", lambda: call(layer_weights=[1.0, 2.0])),
 ("an unknown layer", lambda: FrozenTeacher(tiny_unet(), ("mid_blok",))),
 ("`prediction_type=\"epsilon\"` on a zero-terminal-SNR table", lambda: call(prediction_type="epsilon")),
 ("a diffusers zero-SNR scheduler left at epsilon", lambda: NoiseSchedule.from_diffusers(DDPMScheduler(rescale_betas_zero_snr=True))),
 ("a conditional teacher without `teacher_kwargs`", lambda: ccall()),
 ("`encoder_hidden_states` with another batch size", lambda: ccall(teacher_kwargs={"encoder_hidden_states": torch.randn(3, 5, 16)})),
 ("a diffusers `EMAModel` as teacher", lambda: FrozenTeacher(__import__("diffusers.training_utils", fromlist=["EMAModel"]).EMAModel(tiny_unet().parameters()))),
 ("`reduction=\"avg\"`", lambda: call(reduction="avg")),
 ("`backend=\"cuda\"` on a machine without it", lambda: call(backend="cuda")),
 ("`feature_norm=\"lpips\"`", lambda: call(feature_norm="lpips")),
 ("an FP8 teacher moved to a device without FP8 matmuls (mps)", lambda: __import__("fastperc.teacher_fp8", fromlist=["x"]).require_fp8("mps")),
 ("`dtype=torch.float8_e4m3fn` for a teacher", lambda: FrozenTeacher(tiny_unet(), dtype=torch.float8_e4m3fn)),
 ("an empty sample in `ops.feature_mse`", lambda: fastperc.ops.feature_mse([torch.randn(2, 0)], [torch.randn(2, 0)])),
]
print("| input | exception | message |\n|---|---|---|")
for what, fn in cases:
    try:
        fn(); print(f"| {what} | (none) | |")
    except Exception as e:
        msg = str(e).splitlines()[0].replace("|", "\\|")
        if len(msg) > 260: msg = msg[:257] + "..."
        print(f"| {what} | `{type(e).__name__}` | {msg} |")
