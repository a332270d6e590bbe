"""The fused ops are proper torch.library custom ops: opcheck passes and torch.compile traces the loss."""
import pytest
import torch

from fastperc import FrozenTeacher, NoiseSchedule, self_perceptual_loss
from fastperc.ops import _backend

from .helpers import assert_close, tiny_unet

# (device, fused backend) pairs present here. The reference backend is plain autograd, not a custom op:
# it has no opcheck, only the compile test.
PAIRS = [("cpu", b) for b in ("cpu", "triton") if _backend.why_unavailable(b, "cpu") is None]
if torch.cuda.is_available():
    PAIRS += [("cuda", b) for b in ("cuda", "triton") if _backend.why_unavailable(b, "cuda") is None]
BACKENDS = ["reference"] + [b for d, b in PAIRS if d == "cpu"]
# test_aot_dispatch_dynamic recompiles per call: skipped for the interpreter-bound triton backend (slow).
UTILS = ("test_schema", "test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")


def utils_for(device, backend):
    return UTILS[:3] if (backend == "triton" and device == "cpu") else UTILS


@pytest.mark.parametrize("device, backend", PAIRS)
def test_opcheck_feature_mse(device, backend):
    preds = [torch.randn(3, 4, 5, device=device, requires_grad=True), torch.randn(3, 7, device=device, requires_grad=True)]
    targets = [torch.randn(3, 4, 5, device=device), torch.randn(3, 7, device=device)]
    torch.library.opcheck(torch.ops.fastperc.feature_mse.default, (preds, targets, [1.0, 0.5], backend),
                          test_utils=utils_for(device, backend))


@pytest.mark.parametrize("device, backend", PAIRS)
def test_opcheck_feature_mse_inplace(device, backend):
    preds = [torch.randn(2, 6, device=device), torch.randn(2, 3, 3, device=device)]
    targets = [torch.randn(2, 6, device=device), torch.randn(2, 3, 3, device=device)]
    torch.library.opcheck(torch.ops.fastperc.feature_mse_.default, (preds, targets, [2.0, 1.0], backend),
                          test_utils=utils_for(device, backend))


@pytest.mark.parametrize("device, backend", PAIRS)
def test_opcheck_renoise(device, backend):
    x = [torch.randn(2, 3, 4, 4, device=device) for _ in range(4)]
    x[1].requires_grad_(True)
    coefs = torch.rand(4, 2, device=device)
    torch.library.opcheck(torch.ops.fastperc.renoise.default, (*x, coefs, backend),
                          test_utils=utils_for(device, backend))


@pytest.mark.parametrize("device, backend", PAIRS)
def test_opcheck_scale_rows(device, backend):
    grads = [torch.randn(3, 5, device=device), torch.randn(3, 2, 2, device=device)]
    torch.library.opcheck(torch.ops.fastperc.scale_rows.default, (grads, torch.rand(3, device=device), backend),
                          test_utils=utils_for(device, backend))


@pytest.mark.parametrize("compiler", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_compiled_loss_fullgraph_matches_eager(backend, compiler):
    torch._dynamo.reset()
    schedule = NoiseSchedule.scaled_linear()
    teacher = FrozenTeacher(tiny_unet(num_classes=3), layers=("down_blocks.0", "mid_block"))
    x0, noise = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    t, t2 = torch.randint(0, 1000, (4,)), torch.randint(0, 1000, (4,))
    labels = torch.randint(0, 3, (4,))
    p = torch.randn(4, 1, 8, 8, requires_grad=True)

    def step(pred):
        return self_perceptual_loss(teacher, pred, x0, noise, t, schedule, timesteps_prime=t2, backend=backend,
                                    layer_weights=[0.5, 1.0], teacher_kwargs={"class_labels": labels})

    eager = step(p)
    (g_eager,) = torch.autograd.grad(eager, p)
    compiled = torch.compile(step, fullgraph=True, backend=compiler)
    loss = compiled(p)
    (g,) = torch.autograd.grad(loss, p)
    assert_close(loss, eager, rtol=1e-5, atol=1e-7, what="compiled loss")
    # Inductor fuses and reorders the teacher's fp32 arithmetic: compare the gradient as a vector.
    assert torch.isfinite(g).all()
    assert float((g - g_eager).norm()) <= 1e-4 * float(g_eager.norm()), "compiled grad"
