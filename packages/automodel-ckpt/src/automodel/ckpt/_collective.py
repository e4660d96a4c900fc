"""Rank, world size and barriers that also work without ``torch.distributed`` initialized."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch.distributed as dist


def is_distributed() -> bool:
    """Returns whether a default process group is initialized."""
    return dist.is_available() and dist.is_initialized()


def rank(group: Any = None) -> int:
    """Returns this process's rank in ``group`` (0 without torch.distributed)."""
    return dist.get_rank(group) if is_distributed() else 0


def world_size(group: Any = None) -> int:
    """Returns the number of ranks in ``group`` (1 without torch.distributed)."""
    return dist.get_world_size(group) if is_distributed() else 1


def barrier(group: Any = None) -> None:
    """Waits for every rank of ``group`` (no-op without torch.distributed)."""
    if is_distributed():
        dist.barrier(group)


def broadcast_object(obj: Any, group: Any = None) -> Any:
    """Returns rank 0's ``obj`` on every rank of ``group``."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, 0) if group else 0, group=group)
    return box[0]


def all_ok(ok: bool, message: str, group: Any = None) -> list[str]:
    """Returns the messages of every rank whose ``ok`` was False (so all ranks raise together)."""
    if not is_distributed():
        return [] if ok else [message]
    gathered: list[Any] = [None] * world_size(group)
    dist.all_gather_object(gathered, None if ok else message, group=group)
    return [m for m in gathered if m is not None]


@contextlib.contextmanager
def quiet_single_process() -> Iterator[None]:
    """Silences DCP's "assuming the intent is to save/load in a single process" warning, which
    is expected whenever we call DCP without torch.distributed."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield
