"""Benchmark cases shared by the pytest-benchmark suite and the table script (bench_ops.py)."""
from __future__ import annotations

import torch

from fastperc.ops import _backend, feature_mse, renoise

# SD-like midblock and a 4-layer mix (channels x H x W per sample).
FEATURE_CASES = {
    "mid 32x1280x8x8": [(32, 1280, 8, 8)],
    "4 layers 32x{320@32,640@16,1280@8,1280@8}": [(32, 320, 32, 32), (32, 640, 16, 16), (32, 1280, 8, 8),
                                                  (32, 1280, 8, 8)],
}
# The last renoise case (SD3/Flux-sized latents, 200 MB in fp32) is larger than a GPU's L2 cache.
RENOISE_CASES = {"latents 32x4x64x64": (32, 4, 64, 64), "pixels 32x3x128x128": (32, 3, 128, 128),
                 "latents 32x16x128x128": (32, 16, 128, 128)}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# The dry run of benchmarks/gpu_check.sh: the same code path on shapes a CPU measures in milliseconds.
QUICK_FEATURE_CASES = {"tiny 2x8x4x4": [(2, 8, 4, 4)]}
QUICK_RENOISE_CASES = {"tiny 2x1x8x8": (2, 1, 8, 8)}


def backends_for(device: torch.device) -> list[str]:
    return [b for b in ("reference", "cpu", "triton", "cuda") if _backend.why_unavailable(b, device.type) is None
            and not (b == "triton" and device.type == "cpu")]


def feature_mse_case(shapes, dtype, device, backend, consume: bool = False):
    """(callable computing loss and d loss / d preds, bytes of necessary traffic: read p, t; write grad).

    With `consume`, the targets are overwritten by the gradient, as inside self_perceptual_loss; each
    call then works on the scrambled buffer, which costs the same as fresh targets.
    """
    g = torch.Generator(device=device).manual_seed(0)
    preds = [torch.randn(s, generator=g, device=device, dtype=dtype).requires_grad_(True) for s in shapes]
    targets = [torch.randn(s, generator=g, device=device, dtype=dtype) for s in shapes]

    def run():
        loss = feature_mse(preds, targets, backend=backend, consume_targets=consume)
        return torch.autograd.grad(loss, preds)

    nbytes = 3 * sum(p.numel() for p in preds) * preds[0].element_size()
    return run, nbytes


def renoise_case(shape, dtype, device, backend):
    """(callable writing both teacher inputs, bytes: read 4 images, write 2)."""
    g = torch.Generator(device=device).manual_seed(0)
    xs = [torch.randn(shape, generator=g, device=device, dtype=dtype) for _ in range(4)]
    coefs = [torch.rand(shape[0], generator=g, device=device) for _ in range(4)]

    def run():
        with torch.no_grad():
            return renoise(*xs, *coefs, backend=backend)

    return run, 6 * xs[0].numel() * xs[0].element_size()


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 28) -> float:
    """GB/s of a device-local tensor copy (read + write counted), the roofline for these ops."""
    from torch.utils import benchmark
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    t = benchmark.Timer("dst.copy_(src)", globals={"dst": dst, "src": src}).blocked_autorange(min_run_time=0.5)
    return 2 * nbytes / t.median / 1e9


def capture_graph(fn) -> "torch.cuda.CUDAGraph":
    """`fn` captured in a CUDA graph after a warm-up on a side stream (compiles, allocator pools), so
    replays time the kernels and their launch gaps without the host code."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph
