"""``inspect``: what a checkpoint holds (format, files, tensors, parameter count), from headers only."""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from automodel.ckpt._sources import open_source

__all__ = ["CheckpointSummary", "TensorSummary", "inspect"]


@dataclass(frozen=True)
class TensorSummary:
    """One stored tensor: name, dtype (e.g. ``"torch.bfloat16"``), shape and size in bytes."""

    name: str
    dtype: str
    shape: list[int]
    nbytes: int


@dataclass
class CheckpointSummary:
    """A checkpoint's format, files (name -> bytes), tensors, parameter count and total size."""

    path: str
    format: str
    files: dict[str, int]
    tensors: list[TensorSummary]
    num_parameters: int
    total_bytes: int
    dtypes: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """Returns the summary as JSON-ready dicts and lists."""
        return asdict(self)


def inspect(path: str | os.PathLike[str]) -> CheckpointSummary:
    """Returns a summary of the checkpoint at ``path`` (any format ``load`` reads); reads headers only.

    Example:
        >>> import tempfile, torch
        >>> from automodel.ckpt import save, inspect
        >>> info = inspect(save({"w": torch.ones(2, 3)}, tempfile.mkdtemp()))
        >>> info.format, info.num_parameters, info.tensors[0].shape
        ('safetensors', 6, [2, 3])
    """
    with open_source(Path(path)) as source:
        tensors = [
            TensorSummary(name, str(info.dtype), list(info.shape), info.nbytes)
            for name, info in source.tensors.items()
        ]
        dtypes: dict[str, int] = {}
        for t in tensors:
            dtypes[t.dtype] = dtypes.get(t.dtype, 0) + math.prod(t.shape)
        return CheckpointSummary(
            path=str(path),
            format=source.format,
            files={f.name: f.stat().st_size for f in source.files},
            tensors=tensors,
            num_parameters=sum(math.prod(t.shape) for t in tensors),
            total_bytes=sum(t.nbytes for t in tensors),
            dtypes=dtypes,
        )
