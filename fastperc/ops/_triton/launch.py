"""Launch plumbing shared by the Triton kernels: the device guard and the grid geometry.

Kept free of Triton imports so the geometry is testable as plain arithmetic.
"""
from __future__ import annotations

import contextlib

import torch
from ...errors import InputError

MAX_GRID_X = 2**31 - 1  # CUDA grid limits: x up to 2^31 - 1 blocks, y and z up to 65535
MAX_GRID_YZ = 65535


def device_guard(device: torch.device):
    """Make the tensors' GPU the current one for the launch: Triton launches on the current device
    and its current stream, which for cuda:1 tensors with cuda:0 current is the wrong one."""
    if device.type == "cuda":
        return torch.cuda.device(device)
    return contextlib.nullcontext()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def rows_by_chunks_grid(batch: int, n: int, block: int, max_yz: int = MAX_GRID_YZ) -> tuple[int, int, int]:
    """Grid (chunks, rows_y, rows_z) for a kernel over `batch` rows of `n` elements in `block`-sized chunks.

    Chunks go on axis x (up to 2^31 - 1); rows on y, spilling into z when there are more than
    `max_yz` of them. The kernel's row is program_id(1) + program_id(2) * num_programs(1) and it masks
    rows >= batch (the last z slice may be partial).
    """
    if batch < 1 or n < 1 or block < 1:
        raise InputError(f"grid: expected batch, n and block >= 1, got {batch}, {n}, {block}")
    chunks = cdiv(n, block)
    if chunks > MAX_GRID_X:
        raise InputError(f"grid: {n} elements per row need {chunks} chunks of {block}, more than {MAX_GRID_X}")
    rows_y = min(batch, max_yz)
    rows_z = cdiv(batch, rows_y)
    if rows_z > max_yz:
        raise InputError(f"grid: {batch} rows exceed {max_yz} x {max_yz}")
    return chunks, rows_y, rows_z


def flat_programs(counts: list[int]) -> int:
    """Programs of a 1-D launch covering several segments; refuses what the x axis cannot hold."""
    total = sum(counts)
    if total > MAX_GRID_X:
        raise InputError(f"grid: {total} programs exceed the {MAX_GRID_X} a launch can hold")
    return total
