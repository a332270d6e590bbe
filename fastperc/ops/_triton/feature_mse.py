"""Triton feature_mse: one launch over every (layer, sample, chunk) of up to MAX_LAYERS layers computes
each chunk's weighted squared-error sum and writes the gradient 2w/N (p - t) in the same pass; a small
second launch sums each sample's partials in a fixed order (deterministic, no atomics).

Buffers are dense with the batch outermost, so sample b of a layer is the flat range [b*N, (b+1)*N).
The backward (`scale_rows`) scales every layer's stored gradient by grad_output[b] in one launch of
the same geometry. Partials are laid out sample-major, (batch, chunks of every layer), so the second launch needs no
per-layer metadata. Everything per layer travels as kernel arguments: no tensor is built from host
data per call (that would be a blocking copy and would break CUDA-graph capture).
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from .launch import device_guard, flat_programs

MAX_LAYERS = 4  # argument slots per launch; more layers take more launches
BLOCK = 4096    # elements per program: 4 warps x 32 lanes x 32 elements
RBLOCK = 128


@triton.jit
def _chunk(P, T, G, n, cpr, start, coff, s_hi, s_lo, pid, PARTIAL, total_cpr, BLOCK: tl.constexpr,
           ACC: tl.constexpr):
    # All offsets in int64: a sample may hold more than 2^31 elements.
    local = (pid - start).to(tl.int64)
    row = local // cpr
    chunk = local % cpr
    offs = chunk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    base = row * n
    # The gradient scale 2w/N arrives as a float32 pair (hi + lo): float64 data keeps ~48 bits of it.
    scale = tl.cast(s_hi, ACC) + tl.cast(s_lo, ACC)
    p = tl.load(P + base + offs, mask=mask, other=0.0).to(ACC)
    t = tl.load(T + base + offs, mask=mask, other=0.0).to(ACC)  # read before G (which may be T) is written
    d = p - t
    tl.store(G + base + offs, (d * scale).to(G.dtype.element_ty), mask=mask)
    tl.store(PARTIAL + row * total_cpr + coff + chunk, tl.sum(d * d, axis=0) * (scale * 0.5))


@triton.jit
def _feature_mse_partials_kernel(
        PARTIAL, total_cpr,
        P0, T0, G0, n0, c0, st0, co0, sh0, sl0,
        P1, T1, G1, n1, c1, st1, co1, sh1, sl1,
        P2, T2, G2, n2, c2, st2, co2, sh2, sl2,
        P3, T3, G3, n3, c3, st3, co3, sh3, sl3,
        NUM_LAYERS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    # Layer l owns programs [st_l, st_{l+1}); a branch on a uniform scalar costs nothing.
    if NUM_LAYERS > 3 and pid >= st3:
        _chunk(P3, T3, G3, n3, c3, st3, co3, sh3, sl3, pid, PARTIAL, total_cpr, BLOCK, ACC)
    elif NUM_LAYERS > 2 and pid >= st2:
        _chunk(P2, T2, G2, n2, c2, st2, co2, sh2, sl2, pid, PARTIAL, total_cpr, BLOCK, ACC)
    elif NUM_LAYERS > 1 and pid >= st1:
        _chunk(P1, T1, G1, n1, c1, st1, co1, sh1, sl1, pid, PARTIAL, total_cpr, BLOCK, ACC)
    else:
        _chunk(P0, T0, G0, n0, c0, st0, co0, sh0, sl0, pid, PARTIAL, total_cpr, BLOCK, ACC)


@triton.jit
def _feature_mse_finalize_kernel(PARTIAL, OUT, total_cpr, RBLOCK: tl.constexpr, ACC: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    acc = tl.zeros([RBLOCK], dtype=ACC)
    for c in range(0, total_cpr, RBLOCK):
        offs = c + tl.arange(0, RBLOCK).to(tl.int64)
        acc += tl.load(PARTIAL + b * total_cpr + offs, mask=offs < total_cpr, other=0.0)
    prev = tl.load(OUT + b)
    tl.store(OUT + b, prev + tl.sum(acc, axis=0))


@triton.jit
def _scale_chunk(G, O, n, cpr, start, pid, SCALE, BLOCK: tl.constexpr, ACC: tl.constexpr):
    local = (pid - start).to(tl.int64)
    row = local // cpr
    offs = (local % cpr) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < n
    s = tl.load(SCALE + row)
    g = tl.load(G + row * n + offs, mask=mask, other=0.0).to(ACC)  # O may be G: read before written
    tl.store(O + row * n + offs, (g * s).to(O.dtype.element_ty), mask=mask)


@triton.jit
def _scale_rows_kernel(
        SCALE,
        G0, O0, n0, c0, st0,
        G1, O1, n1, c1, st1,
        G2, O2, n2, c2, st2,
        G3, O3, n3, c3, st3,
        NUM_LAYERS: tl.constexpr, BLOCK: tl.constexpr, ACC: tl.constexpr):
    pid = tl.program_id(0)
    if NUM_LAYERS > 3 and pid >= st3:
        _scale_chunk(G3, O3, n3, c3, st3, pid, SCALE, BLOCK, ACC)
    elif NUM_LAYERS > 2 and pid >= st2:
        _scale_chunk(G2, O2, n2, c2, st2, pid, SCALE, BLOCK, ACC)
    elif NUM_LAYERS > 1 and pid >= st1:
        _scale_chunk(G1, O1, n1, c1, st1, pid, SCALE, BLOCK, ACC)
    else:
        _scale_chunk(G0, O0, n0, c0, st0, pid, SCALE, BLOCK, ACC)


def split_f32(x: float) -> tuple[float, float]:
    """(hi, lo), both float32-representable, with hi + lo == x to about 48 bits (Triton passes Python
    floats as float32 scalars)."""
    hi = float(np.float32(x))
    return hi, float(np.float32(x - hi))


def launch_plan(numels: list[int], batch: int, weights: list[float], block: int = BLOCK) -> list[dict]:
    """Per launch group: its layers with chunks per row, first program, partial column and scale."""
    groups = []
    for g0 in range(0, len(numels), MAX_LAYERS):
        layers, pid, coff = [], 0, 0
        for l in range(g0, min(g0 + MAX_LAYERS, len(numels))):
            n = numels[l] // batch
            cpr = triton.cdiv(n, block)
            layers.append({"layer": l, "n": n, "cpr": cpr, "start": pid, "coff": coff,
                           "scale": split_f32(2.0 * weights[l] / n)})
            pid += cpr * batch
            coff += cpr
        groups.append({"layers": layers, "programs": flat_programs([pid]), "total_cpr": coff})
    return groups


def forward(preds, targets, grads, weights, per_sample: torch.Tensor, block: int = BLOCK) -> None:
    """Write per-sample loss into `per_sample` (zeroed here) and gradients into `grads` (may be `targets`)."""
    batch = preds[0].shape[0]
    acc = tl.float64 if per_sample.dtype == torch.float64 else tl.float32
    per_sample.zero_()
    if batch == 0:
        return
    with device_guard(per_sample.device):
        for group in launch_plan([p.numel() for p in preds], batch, weights, block):
            args = []
            for j in range(MAX_LAYERS):  # unused slots repeat the first layer; NUM_LAYERS gates them
                L = group["layers"][j] if j < len(group["layers"]) else group["layers"][0]
                l = L["layer"]
                args += [preds[l], targets[l], grads[l], L["n"], L["cpr"], L["start"], L["coff"], *L["scale"]]
            partial = torch.empty(batch * group["total_cpr"], dtype=per_sample.dtype, device=per_sample.device)
            _feature_mse_partials_kernel[(group["programs"],)](
                partial, group["total_cpr"], *args, NUM_LAYERS=len(group["layers"]), BLOCK=block, ACC=acc)
            _feature_mse_finalize_kernel[(batch,)](partial, per_sample, group["total_cpr"], RBLOCK=RBLOCK, ACC=acc)


def scale_rows(grads, scale: torch.Tensor, outs, block: int = BLOCK) -> None:
    """outs[l][b] = grads[l][b] * scale[b]; `outs` may be `grads`; scale is (B,) in the accumulation dtype."""
    batch = scale.shape[0]
    if batch == 0:
        return
    acc = tl.float64 if scale.dtype == torch.float64 else tl.float32
    with device_guard(scale.device):
        for group in launch_plan([g.numel() for g in grads], batch, [1.0] * len(grads), block):
            args = []
            for j in range(MAX_LAYERS):  # unused slots repeat the first layer; NUM_LAYERS gates them
                L = group["layers"][j] if j < len(group["layers"]) else group["layers"][0]
                args += [grads[L["layer"]], outs[L["layer"]], L["n"], L["cpr"], L["start"]]
            _scale_rows_kernel[(group["programs"],)](scale, *args, NUM_LAYERS=len(group["layers"]), BLOCK=block,
                                                     ACC=acc)
