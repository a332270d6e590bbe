"""A quick end-to-end check of the objective: one training step of the default UNet with plain MSE and
with the self-perceptual loss (reference and fused backends), on random data, with timings."""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .loss import self_perceptual_loss
from .models import UNet
from .ops import _backend
from .schedule import NoiseSchedule
from .teacher import FrozenTeacher


def _time(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up
    start = time.perf_counter()
    for _ in range(repeats):
        loss = fn()
    return (time.perf_counter() - start) / repeats, float(loss)


def run(batch_size: int = 32, repeats: int = 3, seed: int = 0) -> dict[str, tuple[float, float]]:
    torch.manual_seed(seed)
    student = UNet(num_classes=10)
    teacher = FrozenTeacher(student)  # stands in for an MSE-pretrained model
    schedule = NoiseSchedule.scaled_linear()
    x0 = torch.rand(batch_size, 1, 32, 32) * 2 - 1
    labels = torch.randint(0, 10, (batch_size,))
    gen = torch.Generator().manual_seed(seed)

    def step(objective: str, backend: str = "auto"):
        student.zero_grad(set_to_none=True)
        noise = torch.randn_like(x0)
        t = torch.randint(0, schedule.num_train_timesteps, (batch_size,))
        v = student(schedule.add_noise(x0, noise, t), t, class_labels=labels)
        if objective == "mse":
            loss = F.mse_loss(v, schedule.velocity(x0, noise, t))
        else:
            loss = self_perceptual_loss(teacher, v, x0, noise, t, schedule, backend=backend, generator=gen,
                                        teacher_kwargs={"class_labels": labels})
        loss.backward()
        return loss.detach()

    fused = _backend.auto_choice(x0.device.type)
    results = {"plain MSE": _time(lambda: step("mse"), repeats),
               "self-perceptual (reference)": _time(lambda: step("sp", "reference"), repeats)}
    if fused != "reference":
        results[f"self-perceptual ({fused})"] = _time(lambda: step("sp", fused), repeats)
    return results


def main(batch_size: int = 32, repeats: int = 3) -> None:
    print(f"fastperc demo: default UNet ({sum(p.numel() for p in UNet(num_classes=10).parameters()) / 1e6:.2f} M params), "
          f"batch {batch_size} of 1x32x32, {torch.get_num_threads()} threads; one forward+backward step each")
    results = run(batch_size, repeats)
    base = results["plain MSE"][0]
    print(f"{'objective':32s} {'loss':>10s} {'ms/step':>9s} {'x MSE':>6s}")
    for name, (sec, loss) in results.items():
        print(f"{name:32s} {loss:10.5f} {sec * 1e3:9.1f} {sec / base:6.2f}")
    print("The training job (MSE teacher, then the self-perceptual fine-tune) is `fastperc train`; see README.")


if __name__ == "__main__":
    main()
