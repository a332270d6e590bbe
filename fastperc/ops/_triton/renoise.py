"""Triton renoise: fake = a*x_t + b*p and real = alpha'*x0 + sigma'*noise in one pass (grid: rows x chunks)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048


@triton.jit
def _renoise_kernel(XT, P, X0, E, COEF, FAKE, REAL, batch, n, BLOCK: tl.constexpr, ACC: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    base = row.to(tl.int64) * n
    a = tl.load(COEF + row).to(ACC)
    b = tl.load(COEF + batch + row).to(ACC)
    ap = tl.load(COEF + 2 * batch + row).to(ACC)
    sp = tl.load(COEF + 3 * batch + row).to(ACC)
    xt = tl.load(XT + base + offs, mask=mask, other=0.0).to(ACC)
    p = tl.load(P + base + offs, mask=mask, other=0.0).to(ACC)
    x0 = tl.load(X0 + base + offs, mask=mask, other=0.0).to(ACC)
    e = tl.load(E + base + offs, mask=mask, other=0.0).to(ACC)
    tl.store(FAKE + base + offs, (a * xt + b * p).to(FAKE.dtype.element_ty), mask=mask)
    tl.store(REAL + base + offs, (ap * x0 + sp * e).to(REAL.dtype.element_ty), mask=mask)


def forward(x_t, p, x0, noise, coefs: torch.Tensor, fake, real, block: int = BLOCK) -> None:
    batch = p.shape[0]
    if p.numel() == 0:
        return
    n = p.numel() // batch
    acc = tl.float64 if p.dtype == torch.float64 else tl.float32
    _renoise_kernel[(batch, triton.cdiv(n, block))](x_t, p, x0, noise, coefs, fake, real, batch, n, BLOCK=block, ACC=acc)
