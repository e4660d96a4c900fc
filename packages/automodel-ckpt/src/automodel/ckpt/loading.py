"""``load``: a Hugging Face safetensors folder or a DCP folder into a plain or sharded model, each rank
reading only the slices it holds (resharding to any mesh on the way)."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor

from automodel.ckpt import _collective as coll
from automodel.ckpt._safetensors_format import parse_dtype
from automodel.ckpt._sources import DCPSource, Source, open_source
from automodel.ckpt._state import alias_groups, local_chunk, named_tensors
from automodel.ckpt.errors import CheckpointError
from automodel.ckpt.key_map import KeyMap, as_key_map

__all__ = ["LoadResult", "load"]


@dataclass
class LoadResult:
    """What ``load`` could not match: target keys absent from the checkpoint, and checkpoint keys
    no target consumed (both empty after a successful ``strict=True`` load)."""

    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)


def load(
    model_or_state_dict: nn.Module | MutableMapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    key_map: KeyMap | Mapping[str, str] | Callable[[str], str] | None = None,
    strict: bool = True,
    dtype: torch.dtype | str | None = None,
    process_group: Any = None,
) -> LoadResult:
    """Returns which keys did not match after loading the checkpoint at ``path`` into the target, in place.

    Works in one process and under ``torch.distributed`` (call it on every rank): targets may hold
    plain tensors or DTensors (FSDP2, TP, 2D...) on any mesh, whatever mesh saved the checkpoint;
    each rank reads only the bytes of its own shards. ``path`` is a Hugging Face folder (single
    file or shards + index, as written by ``save`` or ``save_pretrained``), a ``.safetensors``
    file, or a DCP folder. Values are cast to the target's dtype. Tied weights need only one of
    their names in the checkpoint.

    Args:
        model_or_state_dict: an ``nn.Module`` (its parameters and buffers are overwritten) or a dict
            of tensors (overwritten in place; with ``dtype`` they are replaced by cast copies).
        path: the checkpoint folder or file.
        key_map: maps target keys to checkpoint keys; see ``automodel.ckpt.KeyMap``.
        strict: raise ``CheckpointError`` listing missing and unexpected keys by name when the key
            sets differ. Shape mismatches always raise.
        dtype: first cast the target's floating-point tensors to this dtype (module or dict).
        process_group: the ranks taking part (default: the whole world).

    Returns:
        A ``LoadResult`` with the missing and unexpected keys.

    Example:
        >>> import tempfile, torch
        >>> from automodel.ckpt import save, load
        >>> folder = save({"w": torch.ones(2)}, tempfile.mkdtemp())
        >>> sd = {"w": torch.zeros(2)}
        >>> load(sd, folder, dtype=torch.bfloat16).missing_keys, sd["w"].dtype
        ([], torch.bfloat16)
    """
    target_dtype = parse_dtype(dtype)
    if target_dtype is not None:
        _cast_target(model_or_state_dict, target_dtype)
    targets = named_tensors(model_or_state_dict)
    km = as_key_map(key_map)
    with open_source(Path(path)) as source:
        if isinstance(source, DCPSource) and all(km.hf_name(n) is not None for n in targets):
            return _load_dcp(targets, source, km, strict, process_group)
        return _load_from_source(targets, source, km, strict)


def _cast_target(target: nn.Module | MutableMapping[str, torch.Tensor], dtype: torch.dtype) -> None:
    if isinstance(target, nn.Module):
        target.to(dtype)
        return
    for name, tensor in list(target.items()):
        if tensor.is_floating_point() and tensor.dtype != dtype:
            target[name] = tensor.to(dtype)


class _Tracked:
    """Reads full checkpoint tensors for ``KeyMap.from_hf`` and remembers which keys were used."""

    def __init__(self, source: Source) -> None:
        self.source = source
        self.used: set[str] = set()
        self.missing: list[str] = []

    def __call__(self, key: str) -> torch.Tensor:
        if key not in self.source.tensors:
            self.missing.append(key)
            raise KeyError(key)
        self.used.add(key)
        return self.source.read(key)


def _load_from_source(
    targets: dict[str, torch.Tensor], source: Source, km: KeyMap, strict: bool
) -> LoadResult:
    plans: list[tuple[list[str], str | None]] = []  # (alias group, checkpoint key or None)
    missing: list[str] = []
    used: set[str] = set()
    mismatched: list[str] = []
    for group in alias_groups(targets):
        keys = [km.hf_name(n) for n in group]
        if any(k is None for k in keys):
            plans.append((group, None))
            continue
        present = [k for k in keys if k is not None and k in source.tensors]
        used.update(present)
        if not present:
            missing.extend(group)
            continue
        info = source.tensors[present[0]]
        shape = tuple(targets[group[0]].shape)
        if info.shape != shape:
            mismatched.append(
                f"{group[0]!r}: checkpoint {present[0]!r} has shape {list(info.shape)}, "
                f"the target {list(shape)}"
            )
        plans.append((group, present[0]))
    if mismatched:
        raise CheckpointError(
            f"{source.path}: shape mismatch for {len(mismatched)} tensor(s): "
            + "; ".join(mismatched)
        )
    tracked = _Tracked(source)
    with torch.no_grad():
        for group, key in plans:
            target = targets[group[0]]
            if key is not None:
                _fill(target, functools.partial(source.read, key))
                continue
            try:
                full = km.from_hf(group[0], tracked)
            except KeyError:
                missing.extend(group)
                continue
            if tuple(full.shape) != tuple(target.shape):
                raise CheckpointError(
                    f"key map built {group[0]!r} with shape {list(full.shape)}, the target has "
                    f"{list(target.shape)}; fix the key map's from_hf"
                )
            _fill(target, functools.partial(_slice, full))
    used |= tracked.used
    unexpected = [k for k in source.tensors if k not in used]
    result = LoadResult(missing_keys=missing, unexpected_keys=unexpected)
    if strict:
        _raise_if_incomplete(result, source.path)
    return result


def _slice(full: torch.Tensor, offsets: Any, sizes: Any) -> torch.Tensor:
    if offsets is None:
        return full
    return full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))]


def _fill(target: torch.Tensor, read: Callable[[Any, Any], torch.Tensor]) -> None:
    """Copies the target's own chunk, obtained from ``read(offsets, sizes)``, into it in place."""
    if isinstance(target, DTensor):
        chunk = local_chunk(target)
        if chunk is None:
            return
        local = target.to_local()
        local.copy_(read(*chunk).view(local.shape))
    else:
        target.copy_(read(None, None))


def _raise_if_incomplete(result: LoadResult, path: Path) -> None:
    problems = []
    if result.missing_keys:
        problems.append(
            f"{len(result.missing_keys)} missing key(s): {', '.join(result.missing_keys[:10])}"
            + (" ..." if len(result.missing_keys) > 10 else "")
        )
    if result.unexpected_keys:
        problems.append(
            f"{len(result.unexpected_keys)} unexpected key(s): "
            f"{', '.join(result.unexpected_keys[:10])}"
            + (" ..." if len(result.unexpected_keys) > 10 else "")
        )
    if problems:
        raise CheckpointError(
            f"{path} does not match the target: {'; '.join(problems)} "
            "(pass a key_map to rename keys, or strict=False to load what matches)"
        )


def _load_dcp(
    targets: dict[str, torch.Tensor], source: DCPSource, km: KeyMap, strict: bool, group: Any
) -> LoadResult:
    """Loads through ``dcp.load`` (collective), which reads and reshards only the needed chunks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultLoadPlanner

    wanted: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    mismatched: list[str] = []
    for names in alias_groups(targets):
        keys = [k for k in (km.hf_name(n) for n in names) if k in source.tensors]
        if not keys:
            missing.extend(names)
            continue
        tensor = targets[names[0]]
        info = source.tensors[keys[0]]
        if info.shape != tuple(tensor.shape):
            mismatched.append(
                f"{names[0]!r}: checkpoint {list(info.shape)}, target {list(tensor.shape)}"
            )
        wanted[keys[0]] = tensor
    if mismatched:
        raise CheckpointError(f"{source.path}: shape mismatch: {'; '.join(mismatched)}")
    unexpected = [k for k in source.tensors if k not in wanted]
    result = LoadResult(missing_keys=missing, unexpected_keys=unexpected)
    if strict:
        _raise_if_incomplete(result, source.path)
    # DCP copies into the given tensors; plain tensors of another dtype get a staging copy.
    staged = {
        k: (
            t
            if isinstance(t, DTensor) or t.dtype == source.tensors[k].dtype
            else torch.empty_like(t, dtype=source.tensors[k].dtype)
        )
        for k, t in wanted.items()
    }
    with torch.no_grad():
        with coll.quiet_single_process():
            dcp.load(
                staged,
                checkpoint_id=str(source.path),
                planner=DefaultLoadPlanner(allow_partial_load=not strict),
                process_group=group,
                no_dist=not (dist.is_available() and dist.is_initialized()),
            )
        for k, t in staged.items():
            if t is not wanted[k]:
                wanted[k].copy_(t)
    return result
