"""``save``: a model or state dict to a Hugging Face safetensors folder or a DCP folder, from any number
of ranks, each writing only its own slices straight into the final files."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from automodel.ckpt import _collective as coll
from automodel.ckpt._layout import (
    CHECKSUMS_NAME,
    Layout,
    create_files,
    plan_layout,
    remove_stale_weights,
    write_index,
    write_text_durably,
)
from automodel.ckpt._safetensors_format import (
    contiguous_runs,
    dtype_to_str,
    parse_dtype,
    pwrite_all,
    tensor_bytes,
)
from automodel.ckpt._size import parse_size
from automodel.ckpt._state import (
    alias_groups,
    is_primary_replica,
    local_chunk,
    named_tensors,
    without_partial,
)
from automodel.ckpt.errors import CheckpointError
from automodel.ckpt.key_map import KeyMap, as_key_map

__all__ = ["save"]


def save(
    model_or_state_dict: nn.Module | Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
    *,
    format: Literal["safetensors", "dcp"] = "safetensors",
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | str | None = None,
    key_map: KeyMap | Mapping[str, str] | Callable[[str], str] | None = None,
    checksums: bool = False,
    process_group: Any = None,
) -> Path:
    """Returns ``path`` after saving the model's (or state dict's) tensors there.

    Call it on every rank when running under ``torch.distributed``: plain tensors, DTensors and
    FSDP2-/TP-sharded models are supported, each rank writes only the data it holds, and the work
    of writing replicated tensors is spread across ranks. With ``format="safetensors"`` the result
    is a standard Hugging Face folder (``model.safetensors`` or ``model-0000i-of-0000N.safetensors``
    + ``model.safetensors.index.json``, header metadata ``format=pt``) that
    ``transformers.AutoModel*.from_pretrained`` and ``safetensors.safe_open`` read directly; the
    model's ``config`` (anything with ``save_pretrained``) is written next to it. Tied weights are
    stored once, under their first name. The folder needs to be on a file system every rank sees.

    Args:
        model_or_state_dict: an ``nn.Module`` (its ``state_dict()``) or a dict of tensors.
        path: destination folder, created if needed; earlier weight files in it are replaced.
        format: ``"safetensors"`` (Hugging Face layout) or ``"dcp"`` (torch.distributed.checkpoint).
        max_shard_size: largest file, as bytes or a string like ``"5GB"`` (safetensors only).
        dtype: cast floating-point tensors to this dtype on the way out (e.g. ``torch.bfloat16``).
        key_map: renames keys and splits/merges fused tensors; see ``automodel.ckpt.KeyMap``.
        checksums: also write ``SHA256SUMS`` (checked by ``verify``); costs one read of the files.
        process_group: the ranks taking part (default: the whole world).

    Returns:
        The destination folder as a ``Path``.

    Example:
        >>> import tempfile, torch
        >>> from automodel.ckpt import save, load
        >>> folder = save({"w": torch.ones(2, 3)}, tempfile.mkdtemp())
        >>> sd = {"w": torch.zeros(2, 3)}; _ = load(sd, folder); float(sd["w"].sum())
        6.0
    """
    path = Path(path)
    if format not in ("safetensors", "dcp"):
        raise CheckpointError(f"format={format!r} is not supported; use 'safetensors' or 'dcp'")
    out_dtype = parse_dtype(dtype)
    if out_dtype is not None:
        dtype_to_str(out_dtype)
    max_bytes = parse_size(max_shard_size)
    tensors = hf_tensors(named_tensors(model_or_state_dict), as_key_map(key_map), out_dtype)
    rank = coll.rank(process_group)
    if rank == 0:
        path.mkdir(parents=True, exist_ok=True)
    coll.barrier(process_group)
    if format == "dcp":
        import torch.distributed.checkpoint as dcp

        with coll.quiet_single_process():
            dcp.save(
                dict(tensors),
                checkpoint_id=str(path),
                process_group=process_group,
                no_dist=not coll.is_distributed(),
            )
    else:
        write_safetensors(plan_write(tensors, process_group), path, max_bytes, process_group)
        if checksums:
            write_checksums(path, process_group)
    if rank == 0 and isinstance(model_or_state_dict, nn.Module):
        save_configs(model_or_state_dict, path)
    coll.barrier(process_group)
    return path


def hf_tensors(
    tensors: Mapping[str, torch.Tensor], key_map: KeyMap, dtype: torch.dtype | None
) -> dict[str, torch.Tensor]:
    """Returns the checkpoint-keyed tensors to store: ties dropped, key map and dtype applied.

    DTensors stay sharded unless the key map splits or merges them (then they are gathered first).
    """
    out: dict[str, torch.Tensor] = {}
    for group in alias_groups(tensors):
        name = group[0]
        tensor = tensors[name].detach()
        hf_name = key_map.hf_name(name)
        if hf_name is None:
            full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
            pairs = key_map.to_hf(name, full)
        else:
            pairs = [(hf_name, tensor)]
        for hf, t in pairs:
            if hf in out:
                raise CheckpointError(
                    f"key map produced checkpoint key {hf!r} twice (second time from {name!r}); "
                    "each checkpoint key must come from one tensor"
                )
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            out[hf] = t
    return out


@dataclass
class _OwnShard:
    """The chunk ``[offsets, offsets + sizes)`` of tensor ``name`` that this rank writes."""

    name: str
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    data: torch.Tensor  # contiguous, on CPU


@dataclass
class WritePlan:
    """Every tensor's (name, dtype, full shape), in file order, and the chunks this rank writes."""

    specs: list[tuple[str, torch.dtype, tuple[int, ...]]]
    shards: list[_OwnShard]


def plan_write(tensors: dict[str, torch.Tensor], group: Any, *, copy: bool = False) -> WritePlan:
    """Returns what this rank must write for ``tensors``; with ``copy`` the data is snapshotted.

    DTensor shards are written by the rank holding them (the first replica when replicated); plain
    tensors, assumed equal on every rank, are spread round-robin. Only Partial DTensors communicate.
    """
    rank, world = coll.rank(group), coll.world_size(group)
    specs: list[tuple[str, torch.dtype, tuple[int, ...]]] = []
    shards: list[_OwnShard] = []
    plain_index = 0
    for name, tensor in tensors.items():
        specs.append((name, tensor.dtype, tuple(tensor.shape)))
        if tensor.device.type == "meta" or (
            isinstance(tensor, DTensor) and tensor.to_local().is_meta
        ):
            raise CheckpointError(f"tensor {name!r} is on the meta device; materialize it first")
        if isinstance(tensor, DTensor):
            tensor = without_partial(tensor)
            chunk = local_chunk(tensor)
            if chunk is None or not is_primary_replica(tensor):
                continue
            offsets, sizes = chunk
            local = tensor.to_local()
        else:
            plain_index += 1
            if (plain_index - 1) % world != rank or tensor.numel() == 0:
                continue
            offsets, sizes, local = (0,) * tensor.dim(), tuple(tensor.shape), tensor
        data = local.detach().to("cpu").contiguous()
        if copy and data.data_ptr() == local.data_ptr():
            data = data.clone()
        shards.append(_OwnShard(name, offsets, sizes, data))
    return WritePlan(specs, shards)


def write_safetensors(plan: WritePlan, path: Path, max_bytes: int, group: Any) -> None:
    """Writes a planned save into ``path`` (existing folder) as a HF safetensors checkpoint.

    Rank 0 creates every file at its final size with its header; then each rank writes its chunks
    at their offsets with ``pwrite`` and fsyncs; rank 0 writes the index last. Collective over
    ``group`` (barriers only), so it may run in a background thread on a dedicated group.
    """
    layout = plan_layout(plan.specs, max_bytes)
    if coll.rank(group) == 0:
        remove_stale_weights(path, layout.files)
        create_files(path, layout)
    coll.barrier(group)
    _write_own_slices(plan.shards, path, layout)
    coll.barrier(group)
    if coll.rank(group) == 0:
        write_index(path, layout)


def _write_own_slices(shards: list[_OwnShard], path: Path, layout: Layout) -> None:
    """Writes this rank's chunks into the pre-sized files, then fsyncs them."""
    fds: dict[int, int] = {}
    try:
        for shard in shards:
            placed = layout.tensors[shard.name]
            if placed.file not in fds:
                fds[placed.file] = os.open(path / layout.files[placed.file], os.O_WRONLY)
            buf, item = tensor_bytes(shard.data), shard.data.dtype.itemsize
            for full, start, length in contiguous_runs(placed.shape, shard.offsets, shard.sizes):
                pwrite_all(
                    fds[placed.file],
                    buf[start * item : (start + length) * item],
                    placed.offset + full * item,
                )
        for fd in fds.values():
            os.fsync(fd)
    finally:
        for fd in fds.values():
            os.close(fd)


def write_checksums(path: Path, group: Any = None) -> None:
    """Writes ``SHA256SUMS`` (``sha256sum -c`` format) for the weight files and index in ``path``."""
    files = sorted(p for p in path.glob("*.safetensors")) + sorted(path.glob("*.index.json"))
    rank, world = coll.rank(group), coll.world_size(group)
    mine = {f.name: sha256_file(f) for i, f in enumerate(files) if i % world == rank}
    gathered: list[dict[str, str]] = [mine]
    if coll.is_distributed():
        import torch.distributed as dist

        gathered = [{} for _ in range(world)]
        dist.all_gather_object(gathered, mine, group=group)
    if rank == 0:
        sums = {k: v for part in gathered for k, v in part.items()}
        write_text_durably(
            path / CHECKSUMS_NAME, "".join(f"{sums[f.name]}  {f.name}\n" for f in files)
        )


def sha256_file(path: Path, block: int = 16 << 20) -> str:
    """Returns the hex sha256 of the file ``path``, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(block):
            digest.update(chunk)
    return digest.hexdigest()


def save_configs(model: nn.Module, path: Path) -> None:
    """Writes the model's ``config`` and ``generation_config`` (when it has them) into ``path``."""
    # transformers models carry config/generation_config objects with save_pretrained; duck-typed so
    # that this package never imports transformers.
    for attr in ("config", "generation_config"):
        obj = getattr(model, attr, None)
        if obj is not None and callable(getattr(obj, "save_pretrained", None)):
            obj.save_pretrained(str(path))
