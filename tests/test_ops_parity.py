"""Every backend against float64 truth: hypothesis-drawn layer counts, batch sizes, odd shapes (size-1
dimensions with odd strides and empty samples included), layouts, dtypes, weights, reductions, consume
on/off and aliased taps; fresh random data; outputs poisoned first; NaN never passes.

`make test` draws the same 25 examples per test every run (the "fast" hypothesis profile in conftest);
`make fuzz` draws fresh ones at length (FASTPERC_FUZZ_EXAMPLES, default 2000 there)."""
from __future__ import annotations

import importlib

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from fastperc.ops import _backend, feature_mse, renoise

from .helpers import assert_close

# The op modules, not the functions of the same name that fastperc.ops exports.
fm_mod = importlib.import_module("fastperc.ops.feature_mse")
rn_mod = importlib.import_module("fastperc.ops.renoise")
FUSED = [b for b in ("cpu", "triton", "cuda") if _backend.why_unavailable(b, "cpu") is None
         or (torch.cuda.is_available() and _backend.why_unavailable(b, "cuda") is None)]
BACKENDS = ["reference"] + FUSED
DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (rtol, atol) per dtype for values; the gradient is stored in the input dtype, hence its rounding.
TOL = {torch.float64: (1e-10, 1e-12), torch.float32: (1e-5, 1e-6), torch.bfloat16: (1e-2, 1e-2),
       torch.float16: (2e-3, 1e-3)}
LAYOUTS = ["contiguous", "channels_last", "strided", "transposed", "odd size-1 strides"]


def device_for(backend: str) -> torch.device:
    return torch.device("cpu" if _backend.why_unavailable(backend, "cpu") is None else "cuda")


def make(shape, dtype, layout, device, gen):
    """Fresh random tensor (never zeros) in the requested memory layout."""
    if layout == "strided":  # a non-dense view: every other element of the last dim
        base = torch.randn(*shape[:-1], shape[-1] * 2, generator=gen, dtype=torch.float64)
        x = base[..., ::2]
    else:
        x = torch.randn(*shape, generator=gen, dtype=torch.float64)
    x = x.to(device=device, dtype=dtype)
    if layout == "channels_last" and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "transposed" and x.dim() >= 3:
        x = x.transpose(1, 2).contiguous().transpose(1, 2)
    elif layout == "odd size-1 strides":  # what .contiguous() may leave on size-1 dimensions
        x = x.contiguous().as_strided(x.shape, [17 if n == 1 else st_ for n, st_ in zip(x.shape, x.stride())])
    return x


shapes = st.lists(st.integers(0, 9), min_size=1, max_size=3).filter(lambda s: s.count(0) <= 1)
layer = st.tuples(shapes, st.sampled_from(LAYOUTS), st.floats(0.05, 3.0))


def _alias(targets, alias: str, dtype, device, gen):
    """Make targets share memory: "same" (one tensor for two taps), "views" (slices of one buffer)."""
    if alias == "same" and len(targets) > 1 and targets[1].shape == targets[0].shape:
        targets[1] = targets[0]
    elif alias == "views":
        sizes = [t.numel() for t in targets]
        buf = make((sum(sizes) + 3,), dtype, "contiguous", device, gen)
        off = 0
        for i, t in enumerate(targets):
            targets[i] = buf[off: off + sizes[i]].view(t.shape)
            off += max(1, sizes[i] // 2)  # overlapping slices
    return targets


@pytest.mark.parametrize("backend", BACKENDS)
@given(layers=st.lists(layer, min_size=1, max_size=4), batch=st.integers(1, 5), dtype=st.sampled_from(DTYPES),
       reduction=st.sampled_from(["mean", "sum", "none"]), consume=st.booleans(),
       alias=st.sampled_from(["none", "same", "views"]), seed=st.integers(0, 2**31 - 1))
def test_feature_mse_matches_float64_truth(backend, layers, batch, dtype, reduction, consume, alias, seed):
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(seed)
    shapes_ = [(batch, *s) for s, _, _ in layers]
    if alias == "same" and len(shapes_) > 1:
        shapes_[1] = shapes_[0]
    preds = [make(s, dtype, lay, dev, gen).requires_grad_(True) for s, (_, lay, _) in zip(shapes_, layers)]
    targets = _alias([make(s, dtype, lay, dev, gen) for s, (_, lay, _) in zip(shapes_, layers)], alias, dtype, dev,
                     gen)
    weights = [w for _, _, w in layers]
    if any(p.numel() == 0 for p in preds):  # every backend refuses empty samples alike
        with pytest.raises(ValueError, match=r"pred_feats\[\d\]: expected at least one element per sample"):
            feature_mse(preds, targets, weights, reduction, backend=backend, consume_targets=consume)
        return
    kept = [t.clone() for t in targets]

    loss = feature_mse(preds, targets, weights, reduction, backend=backend, consume_targets=consume)
    gout = torch.rand(loss.shape, generator=gen, dtype=torch.float64).to(dev, loss.dtype) + 0.5
    grads = torch.autograd.grad(loss, preds, gout)

    p64 = [p.detach().double().requires_grad_(True) for p in preds]
    per = sum(w * (p - t.double()).square().flatten(1).mean(1) for p, t, w in zip(p64, kept, weights))
    want = {"mean": per.mean(), "sum": per.sum(), "none": per}[reduction]
    want_grads = torch.autograd.grad(want, p64, gout.double())
    rtol, atol = TOL[dtype]
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(loss, want, rtol=max(rtol, 1e-5) if dtype != torch.float64 else rtol, atol=atol, what="loss")
    subnormal = torch.finfo(dtype).tiny * torch.finfo(dtype).eps
    for i, (g, w) in enumerate(zip(grads, want_grads)):
        assert g.dtype == dtype
        assert_close(g, w, rtol=rtol, atol=atol * float(w.abs().max()) + subnormal, what=f"grad[{i}]")
    if not consume:
        assert all(torch.equal(t, k) for t, k in zip(targets, kept)), "targets were modified"


@pytest.mark.parametrize("backend", FUSED)
@given(layers=st.lists(st.tuples(st.lists(st.integers(1, 9), min_size=1, max_size=3), st.floats(0.1, 2.0)),
                       min_size=1, max_size=6), batch=st.integers(1, 4),
       dtype=st.sampled_from(DTYPES), seed=st.integers(0, 2**31 - 1))
def test_feature_mse_kernel_writes_every_output(backend, layers, batch, dtype, seed):
    """Raw kernel call with NaN-poisoned outputs: any element left unwritten fails."""
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(seed)
    preds = [make((batch, *s), dtype, "contiguous", dev, gen) for s, _ in layers]
    targets = [make((batch, *s), dtype, "contiguous", dev, gen) for s, _ in layers]
    weights = [w for _, w in layers]
    grads = [torch.full_like(p, float("nan")) for p in preds]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    per_sample = torch.full((batch,), float("nan"), dtype=acc, device=dev)
    fm_mod._run(preds, targets, grads, weights, backend, per_sample)
    truth = sum(w * (p.double() - t.double()).square().flatten(1).mean(1) for p, t, w in zip(preds, targets, weights))
    rtol, atol = TOL[dtype]
    assert_close(per_sample, truth, rtol=max(rtol, 1e-5) if dtype != torch.float64 else rtol, atol=atol, what="loss")
    for p, t, g, w in zip(preds, targets, grads, weights):
        want = 2 * w * (p.double() - t.double()) / p[0].numel()
        assert_close(g, want, rtol=rtol, atol=atol * float(want.abs().max()), what="grad")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("n", [4095, 4097, 40000, 70001])
def test_feature_mse_rows_longer_than_one_chunk(backend, n, gen):
    dev = device_for(backend)
    p = [make((3, n), torch.float32, "contiguous", dev, gen), make((3, 7, 11), torch.float32, "contiguous", dev, gen)]
    t = [make((3, n), torch.float32, "contiguous", dev, gen), make((3, 7, 11), torch.float32, "contiguous", dev, gen)]
    got = feature_mse(p, t, [0.7, 1.3], "none", backend=backend)
    want = sum(w * (a.double() - b.double()).square().flatten(1).mean(1) for a, b, w in zip(p, t, [0.7, 1.3]))
    assert_close(got, want, rtol=1e-5, atol=1e-7, what="loss")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_feature_poisons_only_its_own_sample(backend, bad, gen):
    dev = device_for(backend) if backend != "reference" else torch.device("cpu")
    p = [make((4, 6, 5), torch.float32, "contiguous", dev, gen), make((4, 9), torch.float32, "contiguous", dev, gen)]
    t = [make((4, 6, 5), torch.float32, "contiguous", dev, gen), make((4, 9), torch.float32, "contiguous", dev, gen)]
    p[1][2, 4] = bad
    got = feature_mse(p, t, None, "none", backend=backend)
    assert not torch.isfinite(got[2])
    ok = torch.tensor([0, 1, 3])
    want = sum((a.double() - b.double()).square().flatten(1).mean(1) for a, b in zip(p, t))
    assert_close(got[ok], want[ok], rtol=1e-5, atol=1e-7, what="other samples")
    assert not torch.isfinite(feature_mse(p, t, None, "mean", backend=backend))


@pytest.mark.parametrize("backend", BACKENDS)
@given(shape=shapes, batch=st.integers(1, 5), dtype=st.sampled_from(DTYPES), layout=st.sampled_from(LAYOUTS),
       seed=st.integers(0, 2**31 - 1))
def test_renoise_matches_float64_truth(backend, shape, batch, dtype, layout, seed):
    dev = device_for(backend)
    gen = torch.Generator().manual_seed(seed)
    xt, x0, noise = (make((batch, *shape), dtype, layout, dev, gen) for _ in range(3))
    p = make((batch, *shape), dtype, layout, dev, gen).requires_grad_(True)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    coefs = [(torch.rand(batch, generator=gen, dtype=torch.float64) * 4 - 2).to(dev, acc) for _ in range(4)]
    fake, real = renoise(xt, p, x0, noise, *coefs, backend=backend)
    if p.numel() == 0:  # empty samples: empty outputs on every backend
        assert fake.shape == real.shape == p.shape
        return
    gout = make((batch, *shape), dtype, "contiguous", dev, gen)
    (gp,) = torch.autograd.grad(fake, p, gout)

    col = lambda c: c.double().reshape((-1,) + (1,) * len(shape))  # noqa: E731
    want_fake = col(coefs[0]) * xt.double() + col(coefs[1]) * p.detach().double()
    want_real = col(coefs[2]) * x0.double() + col(coefs[3]) * noise.double()
    rtol, atol = TOL[dtype]
    scale = 1 + max(float(want_fake.abs().max()), float(want_real.abs().max()))
    assert fake.dtype == dtype and real.dtype == dtype and fake.shape == p.shape
    assert_close(fake, want_fake, rtol=rtol, atol=atol * scale, what="fake")
    assert_close(real, want_real, rtol=rtol, atol=atol * scale, what="real")
    assert_close(gp, col(coefs[1]) * gout.double(), rtol=rtol, atol=atol * scale, what="grad model_output")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", DTYPES)
def test_renoise_kernel_writes_every_output(backend, dtype, gen):
    dev = device_for(backend)
    xs = [make((3, 5, 77), dtype, "contiguous", dev, gen) for _ in range(4)]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    coefs = torch.rand(4, 3, generator=gen, dtype=torch.float64).to(dev, acc) + 0.1
    fake, real = torch.full_like(xs[0], float("nan")), torch.full_like(xs[0], float("nan"))
    rn_mod._run(*xs, coefs, fake, real, backend)
    c = coefs.double()[:, :, None, None]
    rtol, atol = TOL[dtype]
    assert_close(fake, c[0] * xs[0].double() + c[1] * xs[1].double(), rtol=rtol, atol=atol * 4, what="fake")
    assert_close(real, c[2] * xs[2].double() + c[3] * xs[3].double(), rtol=rtol, atol=atol * 4, what="real")


@pytest.mark.parametrize("backend", FUSED)
def test_consume_targets_writes_the_gradient_into_the_target_buffer(backend, gen):
    dev = device_for(backend)
    p = make((2, 4, 3, 3), torch.float32, "contiguous", dev, gen).requires_grad_(True)
    t = make((2, 4, 3, 3), torch.float32, "contiguous", dev, gen)
    want = 2 * (p.detach() - t) / 36
    ptr = t.data_ptr()
    loss = feature_mse([p], [t], reduction="sum", backend=backend, consume_targets=True)
    assert t.data_ptr() == ptr
    assert_close(t, want, rtol=1e-5, atol=1e-7, what="target buffer now holding the gradient")
    (g,) = torch.autograd.grad(loss, [p])
    assert_close(g, want, rtol=1e-5, atol=1e-7, what="grad")


def test_auto_picks_the_compiled_cpu_kernels_here():
    assert _backend.resolve("auto", torch.device("cpu")) == "cpu", _backend.why_unavailable("cpu", "cpu")
