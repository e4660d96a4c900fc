"""Launch geometry shared by the Triton kernels: block sizes, warp counts, persistent grids."""

from __future__ import annotations

import functools

import torch
import triton


def row_block(n_cols: int) -> int:
    """Returns the power-of-two block that holds one row of ``n_cols`` elements."""
    return triton.next_power_of_2(n_cols)


def warps_for(block: int) -> int:
    """Returns a warp count that gives each thread a handful of a ``block``-wide row."""
    if block >= 8192:
        return 16
    if block >= 2048:
        return 8
    return 4


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def persistent_programs(device: torch.device, n_rows: int, per_sm: int = 4) -> int:
    """Returns how many programs a row-reducing kernel launches (a few per SM, at most one a row)."""
    if device.type != "cuda":
        return max(1, min(n_rows, 4))  # the CPU interpreter: a few programs suffice
    index = device.index if device.index is not None else torch.cuda.current_device()
    return max(1, min(n_rows, per_sm * _sm_count(index)))
