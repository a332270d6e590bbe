"""Edge cases every backend must treat alike: size-1 dimensions with odd strides, empty samples, more
layers than one launch holds, unaligned storage, huge grids, the tensors' own device, and no tensor
built from host data on the launch path."""
from __future__ import annotations

import contextlib
import importlib

import pytest
import torch

from fastperc.ops import _backend, feature_mse, renoise

from .helpers import HostSyncAlarm, assert_close

BACKENDS = ["reference"] + [b for b in ("cpu", "triton") if _backend.why_unavailable(b, "cpu") is None]
TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-2, 1e-2)}


def truth_loss(preds, targets, weights):
    return sum(w * (p.detach().double() - t.double()).square().flatten(1).mean(1)
               for p, t, w in zip(preds, targets, weights))


def odd_size1_strides(x: torch.Tensor, odd: int) -> torch.Tensor:
    """The same values and element order, with arbitrary strides on the size-1 dimensions."""
    strides = [odd if n == 1 else s for n, s in zip(x.shape, x.stride())]
    return x.contiguous().as_strided(x.shape, strides)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 1, 5, 1), (1, 4, 1, 6), (2, 1)])
def test_size_one_dims_with_odd_strides_give_the_true_result(backend, shape, gen):
    p = odd_size1_strides(torch.randn(shape, generator=gen), 7).requires_grad_(True)
    t = odd_size1_strides(torch.randn(shape, generator=gen), 11)  # other odd strides than p
    assert p.is_contiguous() and t.is_contiguous() and p.stride() != t.stride()
    loss = feature_mse([p], [t], [0.8], "none", backend=backend)
    assert_close(loss, truth_loss([p], [t], [0.8]), rtol=1e-5, atol=1e-7, what="loss")
    (g,) = torch.autograd.grad(loss.sum(), [p])
    n = p[0].numel()
    assert_close(g, 2 * 0.8 * (p.detach() - t) / n, rtol=1e-5, atol=1e-7, what="grad")

    xs = [odd_size1_strides(torch.randn(shape, generator=gen), s) for s in (5, 9, 13, 3)]
    c = [torch.rand(shape[0], generator=gen) + 0.1 for _ in range(4)]
    fake, real = renoise(*xs, *c, backend=backend)
    col = lambda v: v.reshape((-1,) + (1,) * (len(shape) - 1))  # noqa: E731
    assert_close(fake, col(c[0]) * xs[0] + col(c[1]) * xs[1], rtol=1e-5, atol=1e-6, what="fake")
    assert_close(real, col(c[2]) * xs[2] + col(c[3]) * xs[3], rtol=1e-5, atol=1e-6, what="real")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 0), (3, 4, 0, 2), (0, 5)])
def test_empty_samples_are_one_clear_error_on_every_backend(backend, shape):
    p, t = torch.randn(shape, requires_grad=True), torch.randn(shape)
    want = "at least one sample" if shape[0] == 0 else "at least one element per sample"
    with pytest.raises(ValueError, match=rf"pred_feats\[0\]: expected {want}, got shape"):
        feature_mse([p], [t], backend=backend)
    ok = torch.randn(3, 2)
    with pytest.raises(ValueError, match=r"pred_feats\[1\]"):  # a later layer is named too
        feature_mse([ok, p], [ok, t], backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [(3, 0), (0, 4, 2)])
def test_renoise_of_empty_tensors_is_empty_on_every_backend(backend, shape):
    xs = [torch.randn(shape) for _ in range(4)]
    c = [torch.rand(shape[0]) for _ in range(4)]
    fake, real = renoise(*xs, *c, backend=backend)
    assert fake.shape == real.shape == shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("consume", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_more_layers_than_one_launch_holds(backend, consume, dtype, gen):
    """11 layers: three Triton launches (4 per launch), two CUDA launches (8 per launch)."""
    shapes = [(2, 3), (2, 5, 2), (2, 1), (2, 4, 4), (2, 7), (2, 2, 3), (2, 9), (2, 6), (2, 1, 1), (2, 8), (2, 3, 5)]
    preds = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_(True) for s in shapes]
    targets = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in shapes]
    weights = [0.1 * (i + 1) for i in range(len(shapes))]
    want = truth_loss(preds, targets, weights)
    want_grads = [2 * w * (p.detach().double() - t.double()) / p[0].numel() for p, t, w in zip(preds, targets, weights)]
    loss = feature_mse(preds, [t.clone() for t in targets], weights, "none", backend=backend, consume_targets=consume)
    grads = torch.autograd.grad(loss.sum(), preds)
    rtol, atol = TOL[dtype]
    assert_close(loss, want, rtol=max(rtol, 1e-5) if dtype != torch.float64 else rtol, atol=atol, what="loss")
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        assert_close(g, w, rtol=rtol, atol=atol * float(w.abs().max()), what=f"grad[{i}]")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unaligned_storage_offsets_give_the_true_result(backend, dtype, gen):
    """Views one element into their storage: not 16-byte aligned, so vector paths must step aside."""
    def unaligned(shape):
        base = torch.randn(1 + torch.Size(shape).numel(), generator=gen, dtype=torch.float64).to(dtype)
        x = base[1:].view(shape)
        assert x.data_ptr() % 16 != 0
        return x

    shape = (3, 8, 16)  # rows of whole 16-byte vectors: only the offset stops vectorisation
    p, t = unaligned(shape).requires_grad_(True), unaligned(shape)
    loss = feature_mse([p], [t], None, "none", backend=backend)
    rtol, atol = TOL[dtype]
    assert_close(loss, truth_loss([p], [t], [1.0]), rtol=max(rtol, 1e-5), atol=atol, what="loss")
    xs = [unaligned(shape) for _ in range(4)]
    c = [torch.rand(3, generator=gen) + 0.1 for _ in range(4)]
    fake, _ = renoise(*xs, *c, backend=backend)
    want = c[0][:, None, None] * xs[0].double() + c[1][:, None, None] * xs[1].double()
    assert_close(fake, want, rtol=rtol, atol=atol * 4, what="fake")


# ---- Triton launch geometry, device and host-data rules ------------------------------------------------
launch = importlib.import_module("fastperc.ops._triton.launch")


def test_renoise_grid_puts_long_rows_on_x_and_splits_large_batches():
    chunks, y, z = launch.rows_by_chunks_grid(batch=4, n=134_217_728 + 1, block=2048)  # > 65535 chunks per row
    assert chunks == 65537 and (y, z) == (4, 1)
    chunks, y, z = launch.rows_by_chunks_grid(batch=200_000, n=10, block=2048)  # > 65535 rows
    assert chunks == 1 and y == 65535 and z == 4 and y * z >= 200_000
    for batch, n in [(1, 1), (65535, 1), (65536, 3), (3, 2**40)]:
        chunks, y, z = launch.rows_by_chunks_grid(batch, n, 2048)
        assert chunks <= launch.MAX_GRID_X and y <= launch.MAX_GRID_YZ and z <= launch.MAX_GRID_YZ
        assert chunks * 2048 >= n and y * z >= batch and y * (z - 1) < batch
    with pytest.raises(ValueError, match="chunks"):
        launch.rows_by_chunks_grid(2, 2**31 * 2048 + 1, 2048)
    with pytest.raises(ValueError, match="programs"):
        launch.flat_programs([2**30, 2**30])


needs_triton = pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed or not interpreting")


@needs_triton
def test_triton_renoise_covers_rows_split_across_grid_axes(gen):
    tri = importlib.import_module("fastperc.ops._triton.renoise")
    xs = [torch.randn(7, 3, 5, generator=gen) for _ in range(4)]
    coefs = torch.rand(4, 7, generator=gen)
    fake, real = torch.full_like(xs[0], float("nan")), torch.full_like(xs[0], float("nan"))
    tri.forward(*xs, coefs, fake, real, block=4, max_rows_per_axis=3)  # grid (4, 3, 3): rows 7, 8 masked
    c = coefs[:, :, None, None]
    assert_close(fake, c[0] * xs[0] + c[1] * xs[1], rtol=1e-6, atol=1e-6, what="fake")
    assert_close(real, c[2] * xs[2] + c[3] * xs[3], rtol=1e-6, atol=1e-6, what="real")


def test_device_guard_selects_the_tensors_gpu():
    guard = launch.device_guard(torch.device("cuda", 1))
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert isinstance(launch.device_guard(torch.device("cpu")), contextlib.nullcontext)


class _Kernel:
    """Stands in for a @triton.jit kernel: records each launch, and whether a device guard was active."""

    def __init__(self, log, name, guarded):
        self.log, self.name, self.guarded = log, name, guarded

    def __getitem__(self, grid):
        def run(*args, **kwargs):
            self.log.append((self.name, grid, args, kwargs, list(self.guarded)))
        return run


@needs_triton
@pytest.mark.parametrize("op", ["feature_mse", "renoise"])
def test_triton_launchers_guard_the_device_and_pass_metadata_as_arguments(op, monkeypatch, gen):
    mod = importlib.import_module(f"fastperc.ops._triton.{op}")
    log, guarded = [], []

    @contextlib.contextmanager
    def recording_guard(device):
        guarded.append(device)
        yield
        guarded.pop()

    monkeypatch.setattr(mod, "device_guard", recording_guard)
    for name in [n for n in dir(mod) if n.endswith("_kernel")]:
        monkeypatch.setattr(mod, name, _Kernel(log, name, guarded))
    if op == "feature_mse":
        shapes = [(2, 5), (2, 3, 3), (2, 4), (2, 1), (2, 6), (2, 2)]  # 6 layers: two launch groups
        preds = [torch.randn(s, generator=gen) for s in shapes]
        targets = [torch.randn(s, generator=gen) for s in shapes]
        grads = [torch.empty_like(p) for p in preds]
        per_sample = torch.empty(2)
        data = preds + targets + grads + [per_sample]
        with HostSyncAlarm() as alarm:
            mod.forward(preds, targets, grads, [0.5] * 6, per_sample)
    else:
        xs = [torch.randn(3, 4, generator=gen) for _ in range(6)]
        coefs = torch.rand(4, 3, generator=gen)
        data = xs + [coefs]
        with HostSyncAlarm() as alarm:
            mod.forward(*xs[:4], coefs, xs[4], xs[5])
    assert alarm.hits == [], f"the launcher built tensors from host data or synced: {alarm.hits}"
    assert log, "no kernel was launched"
    for name, grid, args, kwargs, active in log:
        assert active == [data[0].device], f"{name} launched outside the device guard"
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        # Every tensor argument is a caller's buffer or one allocated by the launcher (`partial`).
        extra = [a for a in tensors if not any(a is d for d in data)]
        assert all(a.dtype == per_sample.dtype for a in extra) if op == "feature_mse" else not extra
    if op == "feature_mse":
        assert sum(name == "_feature_mse_partials_kernel" for name, *_ in log) == 2


# ---- which GPUs the CUDA build runs on ----------------------------------------------------------------
@pytest.mark.parametrize("cap, sass, ptx, runs", [
    ((9, 0), [80, 90], 90, True),      # own SASS
    ((8, 6), [80, 90], 90, True),      # sm_80 SASS runs on 8.6 (same major, higher minor)
    ((8, 0), [86, 90], 90, False),     # but not the other way round, and PTX 9.0 cannot go down
    ((10, 0), [80, 90], 90, True),     # a newer GPU JIT-compiles the PTX
    ((12, 0), [80, 90, 100, 120], 120, True),
    ((10, 3), [80, 90, 120], 120, False),  # 10.x has no SASS of its major, and PTX 12.0 is newer
    ((7, 5), [80, 90], 90, False),
    ((9, 0), [], 0, True),             # a build that does not say what it holds is trusted
])
def test_cuda_build_runs_on_follows_sass_and_ptx_compatibility(cap, sass, ptx, runs):
    assert _backend.cuda_build_runs_on(cap, sass, ptx) is runs


class _FakeCudaExt:
    """A fastperc._C built with CUDA kernels for sm_90 only."""

    def __getattr__(self, name):
        if name in ("feature_mse_cuda", "renoise_cuda", "feature_mse_cpu"):
            return lambda *a: None
        raise AttributeError(name)

    @staticmethod
    def cuda_archs():
        return {"sass": [90], "ptx": 90}


@pytest.mark.parametrize("cap, expect", [((8, 0), "triton"), ((9, 0), "cuda")])
def test_auto_falls_back_once_when_the_gpu_cannot_run_the_cuda_build(cap, expect, monkeypatch):
    if _backend.why_unavailable("triton", "cuda") == "triton is not installed":
        pytest.skip("triton is not installed")
    monkeypatch.setattr(_backend._ext, "ext", _FakeCudaExt())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda i=None: cap)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=None: "Test GPU")
    monkeypatch.setattr(_backend, "_arch_checked", {})
    monkeypatch.setattr(_backend, "_warned", set())
    dev = torch.device("cuda", 0)
    if expect == "triton":
        with pytest.warns(RuntimeWarning, match=r"'cuda' is unavailable .*capability 8\.0.*FASTPERC_CUDA_ARCHS=\"80\""):
            assert _backend.resolve("auto", dev) == "triton"
        with pytest.raises(RuntimeError, match=r"backend: 'cuda' is not available here: .*capabilities \[90\]"):
            _backend.resolve("cuda", dev)
    else:
        assert _backend.resolve("auto", dev) == "cuda"


# ---- aliased taps: consume_targets must never read a gradient as a target --------------------------------
def _aliased_case(kind: str, gen):
    """(preds, targets, weights) where some targets share memory with each other or with a prediction."""
    def r(*s):
        return torch.randn(*s, generator=gen)

    if kind == "same tensor twice":  # two taps whose modules return one tensor
        t = r(3, 4, 5)
        return [r(3, 4, 5), r(3, 4, 5)], [t, t], [1.0, 0.5]
    if kind == "overlapping views":
        buf = r(3, 20)
        return [r(3, 12), r(3, 12)], [buf[:, :12], buf[:, 8:]], [0.7, 1.3]
    if kind == "disjoint views of one buffer":
        buf = r(3, 24)
        return [r(3, 12), r(3, 12)], [buf[:, :12], buf[:, 12:]], [0.7, 1.3]
    if kind == "target is another layer's prediction":
        shared = r(3, 6)
        return [r(3, 6), shared], [shared, r(3, 6)], [1.0, 2.0]
    raise AssertionError(kind)


ALIAS_KINDS = ["same tensor twice", "overlapping views", "disjoint views of one buffer",
               "target is another layer's prediction"]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ALIAS_KINDS)
def test_aliased_targets_give_the_true_loss_and_gradient(backend, kind, gen):
    preds, targets, weights = _aliased_case(kind, gen)
    preds = [p.requires_grad_(True) for p in preds]
    want = truth_loss(preds, [t.clone() for t in targets], weights)
    want_grads = [2 * w * (p.detach().double() - t.double()) / p[0].numel() for p, t, w in zip(preds, targets, weights)]
    loss = feature_mse(preds, targets, weights, "none", backend=backend, consume_targets=True)
    grads = torch.autograd.grad(loss.sum(), preds)
    assert_close(loss, want, rtol=1e-5, atol=1e-7, what="loss")
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        # Two layers may differentiate one shared prediction: autograd returns their sum for it.
        if kind == "target is another layer's prediction" and i == 1:
            continue
        assert_close(g, w, rtol=1e-5, atol=1e-7, what=f"grad[{i}]")


@pytest.mark.parametrize("backend", BACKENDS)
def test_taps_that_return_one_tensor_match_the_reference_loss(backend, gen):
    """The default UNet's midblock returns its last resnet's output: tapping both aliases one buffer."""
    from fastperc import FrozenTeacher, NoiseSchedule, self_perceptual_loss

    from .helpers import tiny_unet
    model = tiny_unet()
    teacher = FrozenTeacher(model, ("mid_block", "mid_block.resnets.1"))
    feats = teacher(torch.randn(2, 1, 8, 8, generator=gen), torch.tensor([3, 600]))
    assert feats[0].data_ptr() == feats[1].data_ptr(), "the case needs two taps on one tensor"
    schedule = NoiseSchedule.scaled_linear()
    x0, noise = torch.randn(2, 2, 1, 8, 8, generator=gen).unbind(0)
    t, t2 = torch.tensor([10, 700]), torch.tensor([400, 50])
    out = torch.randn(2, 1, 8, 8, generator=gen)
    results = []
    for be in ("reference", backend):
        v = out.clone().requires_grad_(True)
        loss = self_perceptual_loss(teacher, v, x0, noise, t, schedule, layer_weights=[1.0, 0.5],
                                    timesteps_prime=t2, backend=be)
        results.append((loss.detach(), torch.autograd.grad(loss, v)[0]))
    (ref_loss, ref_grad), (loss, grad) = results
    assert_close(loss, ref_loss, rtol=1e-5, atol=1e-8, what="loss")
    # Through the teacher's backward fp32 sums run in another order per path: compare the gradient as
    # one vector (the aliasing bug was off by 126%; rounding is ~1e-6 of the norm).
    assert float((grad - ref_grad).norm()) <= 1e-5 * float(ref_grad.norm()), "gradient of model_output"
