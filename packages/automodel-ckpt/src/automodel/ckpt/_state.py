"""The tensors of a model or state dict, with tied (aliased) entries grouped, and DTensor chunks."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Replicate


def named_tensors(obj: nn.Module | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Returns the tensors of a module's state dict (parameters as themselves) or of a dict."""
    if isinstance(obj, nn.Module):
        return {k: v for k, v in obj.state_dict(keep_vars=True).items() if torch.is_tensor(v)}
    if isinstance(obj, Mapping):
        bad = [k for k, v in obj.items() if not torch.is_tensor(v)]
        if bad:
            raise TypeError(
                f"state dict entries must be tensors; {bad[:3]} are not (save other objects "
                "with CheckpointManager's extra=)"
            )
        return dict(obj)
    raise TypeError(f"expected an nn.Module or a dict of tensors, got {type(obj).__name__}")


def _alias_key(tensor: torch.Tensor) -> tuple[Any, ...] | None:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    if local.numel() == 0 or local.device.type == "meta":
        return None
    return (
        local.untyped_storage().data_ptr(),
        local.storage_offset(),
        tuple(tensor.shape),
        tuple(local.stride()),
        tensor.dtype,
    )


def alias_groups(tensors: Mapping[str, torch.Tensor]) -> list[list[str]]:
    """Returns the names grouped by shared storage (tied weights), each group in state-dict order."""
    groups: dict[Any, list[str]] = {}
    for name, tensor in tensors.items():
        key = _alias_key(tensor)
        groups.setdefault(key if key is not None else ("unique", name), []).append(name)
    return list(groups.values())


def without_partial(tensor: DTensor) -> DTensor:
    """Returns ``tensor`` with pending reductions (Partial placements) applied."""
    if any(p.is_partial() for p in tensor.placements):
        placements = [Replicate() if p.is_partial() else p for p in tensor.placements]
        return tensor.redistribute(tensor.device_mesh, placements)
    return tensor


def local_chunk(tensor: DTensor) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """Returns (offsets, sizes) of this rank's shard of ``tensor`` in the full tensor, or None if empty."""
    chunks = tensor.__create_chunk_list__()  # the protocol DCP itself uses to place DTensor shards
    assert len(chunks) == 1, f"expected one local chunk, got {len(chunks)}"
    sizes = tuple(chunks[0].sizes)
    if 0 in sizes:
        return None
    return tuple(chunks[0].offsets), sizes


def is_primary_replica(tensor: DTensor) -> bool:
    """Returns whether this rank holds the copy of its shard that gets written (coordinate 0 on
    every mesh dim where the tensor is replicated)."""
    coordinate = tensor.device_mesh.get_coordinate()
    if coordinate is None:
        return False
    return all(c == 0 for c, p in zip(coordinate, tensor.placements) if not p.is_shard())
