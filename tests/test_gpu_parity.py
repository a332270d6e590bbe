"""Fixed-case parity of the fused backends on the machine's accelerator (what benchmarks/gpu_check.sh
runs on a GPU; on a CPU machine the same cases run on the cpu and interpreted triton backends).

A fixed, seeded list of shapes per dtype, unlike the hypothesis suite: on a GPU every new shape can
compile a new Triton variant, and a GPU job has minutes. Each case is float64 truth with outputs
poisoned first, so an unwritten element or a NaN fails.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from fastperc.ops import _backend, feature_mse, renoise

from .helpers import assert_close

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
FUSED = {"cuda": ("cuda", "triton"), "cpu": ("cpu", "triton")}[DEVICE.type]
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "bf16": torch.bfloat16, "fp16": torch.float16}
TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-2, 1e-2),
       torch.float16: (2e-3, 1e-3)}
# Feature layer sets: one midblock-like map, odd sizes, rows longer than one program/block, 11 layers.
FEATURE_CASES = {
    "mid": [(4, 64, 8, 8)],
    "odd": [(3, 5, 7), (3, 1), (3, 13, 3)],
    "long rows": [(2, 300_001), (2, 4097)],
    "11 layers": [(2, k + 1, 3) for k in range(11)],
}
RENOISE_CASES = {"latents": (4, 4, 16, 16), "odd": (3, 5, 7), "long rows": (2, 300_001)}
fm_mod = importlib.import_module("fastperc.ops.feature_mse")
rn_mod = importlib.import_module("fastperc.ops.renoise")


def backend_or_skip(backend: str) -> str:
    reason = _backend.why_unavailable(backend, DEVICE.type)
    if reason is not None:
        pytest.skip(f"{backend} on {DEVICE.type}: {reason}")
    return backend


def rand(shape, dtype, gen, layout="contiguous"):
    x = torch.randn(shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "unaligned":  # one element into its storage: no 16-byte vectors
        base = torch.empty(x.numel() + 1, dtype=dtype, device=DEVICE)
        base[1:].copy_(x.flatten())
        x = base[1:].view(shape)
    return x


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", FEATURE_CASES)
def test_feature_mse_kernel_matches_float64_truth(backend, dtype, case, gen):
    backend_or_skip(backend)
    shapes = FEATURE_CASES[case]
    preds = [rand(s, dtype, gen) for s in shapes]
    targets = [rand(s, dtype, gen) for s in shapes]
    weights = [0.25 + 0.5 * i for i in range(len(shapes))]
    grads = [torch.full_like(p, float("nan")) for p in preds]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    per_sample = torch.full((shapes[0][0],), float("nan"), dtype=acc, device=DEVICE)
    fm_mod._run(preds, targets, grads, weights, backend, per_sample)
    truth = sum(w * (p.double() - t.double()).square().flatten(1).mean(1) for p, t, w in zip(preds, targets, weights))
    rtol, atol = TOL[dtype]
    assert_close(per_sample, truth, rtol=rtol if dtype == torch.float64 else max(rtol, 1e-5), atol=atol, what="loss")
    subnormal = torch.finfo(dtype).tiny * torch.finfo(dtype).eps  # fp16 gradients of long rows go subnormal
    for i, (p, t, g, w) in enumerate(zip(preds, targets, grads, weights)):
        want = 2 * w * (p.double() - t.double()) / p[0].numel()
        assert_close(g, want, rtol=rtol, atol=atol * float(want.abs().max()) + subnormal, what=f"grad[{i}]")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", FEATURE_CASES)
@pytest.mark.parametrize("inplace", [False, True], ids=["fresh-out", "in-place"])
def test_scale_rows_kernel_matches_float64_truth(backend, dtype, case, inplace, gen):
    """The backward of feature_mse: every layer's stored gradient times grad_output[b], one launch."""
    backend_or_skip(backend)
    shapes = FEATURE_CASES[case]
    grads = [rand(s, dtype, gen) for s in shapes]
    want = [g.to(torch.float64, copy=True) for g in grads]  # copied: in place overwrites grads
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    scale = (torch.rand(shapes[0][0], generator=gen, dtype=torch.float64) * 4 - 2).to(DEVICE, acc)
    outs = grads if inplace else [torch.full_like(g, float("nan")) for g in grads]
    fm_mod._scale_rows(grads, scale, outs, backend)
    rtol, atol = TOL[dtype]
    for i, (o, w) in enumerate(zip(outs, want)):
        truth = w * scale.double().reshape((-1,) + (1,) * (w.dim() - 1))
        assert_close(o, truth, rtol=rtol, atol=atol * float(truth.abs().max()), what=f"out[{i}]")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("layout", ["channels_last", "unaligned"])
@pytest.mark.parametrize("consume", [False, True])
def test_feature_mse_layouts_and_consume_through_autograd(backend, dtype, layout, consume, gen):
    backend_or_skip(backend)
    shape = (3, 8, 4, 6)
    preds = [rand(shape, dtype, gen, layout).requires_grad_(True), rand((3, 40), dtype, gen)]
    preds[1].requires_grad_(True)
    targets = [rand(shape, dtype, gen, layout), rand((3, 40), dtype, gen)]
    kept = [t.clone() for t in targets]
    loss = feature_mse(preds, targets, [1.5, 0.5], "none", backend=backend, consume_targets=consume)
    gout = torch.rand(3, generator=gen, dtype=torch.float64).to(DEVICE) + 0.5
    grads = torch.autograd.grad(loss, preds, gout.to(loss.dtype))
    rtol, atol = TOL[dtype]
    truth = sum(w * (p.detach().double() - t.double()).square().flatten(1).mean(1)
                for p, t, w in zip(preds, kept, [1.5, 0.5]))
    assert_close(loss, truth, rtol=max(rtol, 1e-5), atol=atol, what="loss")
    for i, (g, p, t, w) in enumerate(zip(grads, preds, kept, [1.5, 0.5])):
        want = gout.double().reshape((-1,) + (1,) * (p.dim() - 1)) * 2 * w * (p.detach().double() - t.double()) / p[0].numel()
        assert_close(g, want, rtol=rtol, atol=atol * float(want.abs().max()), what=f"grad[{i}]")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES.values(), ids=DTYPES.keys())
@pytest.mark.parametrize("case", RENOISE_CASES)
def test_renoise_kernel_matches_float64_truth(backend, dtype, case, gen):
    backend_or_skip(backend)
    shape = RENOISE_CASES[case]
    xs = [rand(shape, dtype, gen) for _ in range(4)]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    coefs = (torch.rand(4, shape[0], generator=gen, dtype=torch.float64) * 4 - 2).to(DEVICE, acc)
    fake, real = torch.full_like(xs[0], float("nan")), torch.full_like(xs[0], float("nan"))
    rn_mod._run(*xs, coefs, fake, real, backend)
    c = coefs.double().reshape(4, -1, *([1] * (len(shape) - 1)))
    want_f, want_r = c[0] * xs[0].double() + c[1] * xs[1].double(), c[2] * xs[2].double() + c[3] * xs[3].double()
    rtol, atol = TOL[dtype]
    scale = 1 + max(float(want_f.abs().max()), float(want_r.abs().max()))
    assert_close(fake, want_f, rtol=rtol, atol=atol * scale, what="fake")
    assert_close(real, want_r, rtol=rtol, atol=atol * scale, what="real")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs: tensors on cuda:1 with cuda:0 current")
@pytest.mark.parametrize("backend", FUSED)
def test_kernels_run_on_the_tensors_gpu_not_the_current_one(backend, gen):
    backend_or_skip(backend)
    dev = torch.device("cuda", 1)
    p = torch.randn(3, 1000, generator=gen).to(dev)
    t = torch.randn(3, 1000, generator=gen).to(dev)
    with torch.cuda.device(0):
        got = feature_mse([p], [t], reduction="none", backend=backend)
        fake, _ = renoise(p, t, p, t, *(torch.full((3,), 0.5, device=dev),) * 4, backend=backend)
    assert_close(got, (p.double() - t.double()).square().mean(1), rtol=1e-5, atol=1e-7, what="loss on cuda:1")
    assert_close(fake, 0.5 * (p.double() + t.double()), rtol=1e-5, atol=1e-6, what="fake on cuda:1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA-graph capture needs a GPU")
@pytest.mark.parametrize("backend", FUSED)
def test_ops_capture_in_a_cuda_graph_without_host_syncs(backend, gen):
    """Capture fails on any host sync or host-to-device copy inside the ops."""
    backend_or_skip(backend)
    p = torch.randn(4, 64, 8, 8, generator=gen).to(DEVICE).requires_grad_(True)
    t = torch.randn(4, 64, 8, 8, generator=gen).to(DEVICE)
    c = [torch.rand(4, generator=gen).to(DEVICE) for _ in range(4)]
    for _ in range(2):  # warm up: Triton compiles, allocator pools fill
        feature_mse([p], [t], backend=backend).backward()
        renoise(t, p, t, t, *c, backend=backend)
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            loss = feature_mse([p], [t], backend=backend)
            fake, _ = renoise(t, p, t, t, *c, backend=backend)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph.replay()
    torch.cuda.synchronize()
    assert_close(loss, (p.detach().double() - t.double()).square().mean(), rtol=1e-5, atol=1e-7, what="graph loss")
