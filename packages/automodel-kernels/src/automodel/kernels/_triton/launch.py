"""Launch set-up shared by the Triton kernels: block sizes, warp counts, persistent grids, and
programmatic dependent launch."""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


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


# Programmatic dependent launch (Hopper and newer): a kernel launched with it may start its
# programs while the kernel before it drains, and waits (``gdc_wait``) before its first load.
# AUTOMODEL_PDL=0 turns it off (read once, at import; tests flip this flag).
PDL_ENABLED = os.environ.get("AUTOMODEL_PDL", "1") != "0"


@functools.cache
def _pdl_supported(device_index: int) -> bool:
    if torch.version.hip is not None or os.environ.get("TRITON_INTERPRET") == "1":
        return False
    if not hasattr(triton.language.extra.cuda, "gdc_wait"):  # Triton before 3.4
        return False
    return torch.cuda.get_device_capability(device_index)[0] >= 9


def use_pdl(device: torch.device) -> bool:
    """Returns whether kernels on ``device`` launch with programmatic dependent launch.

    True on CUDA GPUs of compute capability 9.0 or newer (H100, H200, B200) unless
    ``AUTOMODEL_PDL=0``; never on the CPU interpreter, on ROCm or while torch.compile traces.
    """
    if not PDL_ENABLED or device.type != "cuda":
        return False
    if torch.compiler.is_compiling():
        # Dynamo captures a user Triton launch with its own launcher, which has no PDL option.
        return False
    return _pdl_supported(device.index if device.index is not None else torch.cuda.current_device())


def pdl_kwargs(device: torch.device) -> dict[str, bool]:
    """Returns the keywords of a launch of a PDL-aware kernel: its ``USE_PDL`` constexpr and, when
    on, the ``launch_pdl`` option. Such a kernel calls :func:`wait_for_inputs` first.
    """
    return {"USE_PDL": True, "launch_pdl": True} if use_pdl(device) else {"USE_PDL": False}


@triton.jit
def wait_for_inputs(USE_PDL: tl.constexpr):
    """First statement of a PDL-aware kernel: under programmatic dependent launch, waits until the
    kernels before it have finished and their writes are visible, then lets the next kernel start
    launching its programs (they wait the same way). A no-op when ``USE_PDL`` is false.
    """
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
