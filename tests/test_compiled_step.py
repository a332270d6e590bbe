"""The whole step compiles as one graph: student forward + self-perceptual loss + truncated teacher.

No graph break may come from the loss, the schedule or the fused ops (torch._dynamo.explain counts
them), the compiled step gives the eager loss and gradients, and on a GPU it captures in a CUDA graph
(mode="reduce-overhead"), which fails on any host sync inside it.
"""
from __future__ import annotations

import pytest
import torch

from fastperc import FrozenTeacher, NoiseSchedule, self_perceptual_loss

from .helpers import assert_close, tiny_unet


def _default_unet_step(device="cpu", batch=4):
    student = tiny_unet(num_classes=3).to(device)
    teacher = FrozenTeacher(student, layers=("down_blocks.0", "mid_block"))
    schedule = NoiseSchedule.scaled_linear()
    x0 = torch.randn(batch, 1, 8, 8, device=device)
    noise, labels = torch.randn_like(x0), torch.randint(0, 3, (batch,), device=device)
    t, t2 = torch.randint(0, 1000, (batch,), device=device), torch.randint(0, 1000, (batch,), device=device)

    def step(x0, noise, t, t2, labels):
        v = student(schedule.add_noise(x0, noise, t), t, class_labels=labels)
        return self_perceptual_loss(teacher, v, x0, noise, t, schedule, timesteps_prime=t2,
                                    teacher_kwargs={"class_labels": labels})

    return student, step, (x0, noise, t, t2, labels)


def _diffusers_step(batch=2):
    diffusers = pytest.importorskip("diffusers")
    student = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8, attention_head_dim=2, norm_num_groups=4)
    teacher = FrozenTeacher(student)
    assert teacher.truncated
    schedule = NoiseSchedule.scaled_linear()
    x0 = torch.randn(batch, 4, 8, 8)
    noise, text = torch.randn_like(x0), torch.randn(batch, 5, 8)
    t, t2 = torch.randint(0, 1000, (batch,)), torch.randint(0, 1000, (batch,))

    def step(x0, noise, t, t2, text):
        v = student(schedule.add_noise(x0, noise, t), t, encoder_hidden_states=text).sample
        return self_perceptual_loss(teacher, v, x0, noise, t, schedule, timesteps_prime=t2,
                                    teacher_kwargs={"encoder_hidden_states": text})

    return student, step, (x0, noise, t, t2, text)


def _grads(student, loss):
    params = [p for p in student.parameters() if p.requires_grad]
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, params)])


@pytest.mark.parametrize("build", [_default_unet_step, _diffusers_step], ids=["fastperc-unet", "diffusers-unet"])
def test_student_loss_and_teacher_trace_as_one_graph_without_breaks(build):
    torch._dynamo.reset()
    _, step, inputs = build()
    explanation = torch._dynamo.explain(step)(*inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


# aot_eager traces what inductor gets (dynamo, the custom ops' fake kernels, AOT autograd) in seconds;
# inductor's C++ code generation takes minutes on a CPU: the slow suite.
@pytest.mark.parametrize("build,backend", [
    (_default_unet_step, "aot_eager"), (_diffusers_step, "aot_eager"),
    pytest.param(_default_unet_step, "inductor", marks=pytest.mark.slow)],
    ids=["fastperc-unet-aot_eager", "diffusers-unet-aot_eager", "fastperc-unet-inductor"])
def test_compiled_step_gives_the_eager_loss_and_student_gradients(build, backend):
    torch._dynamo.reset()
    student, step, inputs = build()
    eager = step(*inputs)
    g_eager = _grads(student, eager)
    compiled = torch.compile(step, fullgraph=True, backend=backend)
    loss = compiled(*inputs)
    g = _grads(student, loss)
    assert_close(loss, eager, rtol=1e-5, atol=1e-7, what="compiled loss")
    assert torch.isfinite(g).all()
    # Inductor reorders fp32 arithmetic: compare the gradient as one vector.
    assert float((g - g_eager).norm()) <= 1e-4 * float(g_eager.norm()), "compiled student gradient"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture (reduce-overhead) needs a GPU")
def test_compiled_step_captures_in_a_cuda_graph():
    torch._dynamo.reset()
    student, step, inputs = _default_unet_step("cuda", batch=8)
    eager = step(*inputs)
    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for _ in range(3):  # reduce-overhead records the graph on the second or third call
        loss = compiled(*inputs)
        loss.backward()
        student.zero_grad(set_to_none=True)
    assert_close(loss.detach().clone(), eager, rtol=1e-4, atol=1e-6, what="graph-replayed loss")
