"""Triton renoise: fake = a*x_t + b*p and real = alpha'*x0 + sigma'*noise in one pass.

Grid: chunks on axis 0 (up to 2^31 - 1), rows on axes 1 and 2 (see launch.rows_by_chunks_grid), so
neither a long sample nor a large batch exceeds the 65535 limit of the y and z axes.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .launch import MAX_GRID_YZ, device_guard, rows_by_chunks_grid

BLOCK = 2048


@triton.jit
def _renoise_kernel(XT, P, X0, E, COEF, FAKE, REAL, batch, n, BLOCK: tl.constexpr, ACC: tl.constexpr):
    chunk = tl.program_id(0).to(tl.int64)
    row = tl.program_id(1).to(tl.int64) + tl.program_id(2).to(tl.int64) * tl.num_programs(1)
    live = row < batch  # the last z slice of rows may be partial
    offs = chunk * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = (offs < n) & live
    base = row * n
    a = tl.load(COEF + row, mask=live, other=0.0).to(ACC)
    b = tl.load(COEF + batch + row, mask=live, other=0.0).to(ACC)
    ap = tl.load(COEF + 2 * batch + row, mask=live, other=0.0).to(ACC)
    sp = tl.load(COEF + 3 * batch + row, mask=live, other=0.0).to(ACC)
    xt = tl.load(XT + base + offs, mask=mask, other=0.0).to(ACC)
    p = tl.load(P + base + offs, mask=mask, other=0.0).to(ACC)
    x0 = tl.load(X0 + base + offs, mask=mask, other=0.0).to(ACC)
    e = tl.load(E + base + offs, mask=mask, other=0.0).to(ACC)
    tl.store(FAKE + base + offs, (a * xt + b * p).to(FAKE.dtype.element_ty), mask=mask)
    tl.store(REAL + base + offs, (ap * x0 + sp * e).to(REAL.dtype.element_ty), mask=mask)


def forward(x_t, p, x0, noise, coefs: torch.Tensor, fake, real, block: int = BLOCK,
            max_rows_per_axis: int = MAX_GRID_YZ) -> None:
    """Write both teacher inputs. `max_rows_per_axis` exists for tests of the row split."""
    if p.numel() == 0:
        return
    batch = p.shape[0]
    n = p.numel() // batch
    acc = tl.float64 if p.dtype == torch.float64 else tl.float32
    grid = rows_by_chunks_grid(batch, n, block, max_rows_per_axis)
    with device_guard(p.device):
        _renoise_kernel[grid](x_t, p, x0, noise, coefs, fake, real, batch, n, BLOCK=block, ACC=acc)
