"""``merge``, ``reshard`` and ``convert``: rewrite a checkpoint into another layout, streaming.

Memory stays bounded by one tensor (safetensors sources: bytes are copied file-to-file in the kernel
with ``copy_file_range`` when no dtype change is asked, so not even that) or one output shard (DCP
sources are read one output shard at a time), whatever the size of the model.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from automodel.ckpt import _collective as coll
from automodel.ckpt._destination import check_destination, copy_side_files, staged_folder
from automodel.ckpt._layout import Layout, plan_layout, write_index
from automodel.ckpt._safetensors_format import (
    contiguous_runs,
    dtype_to_str,
    parse_dtype,
    pwrite_all,
    tensor_bytes,
)
from automodel.ckpt._size import parse_size
from automodel.ckpt._sources import (
    DCPSource,
    SafetensorsSource,
    ShardedSafetensorsSource,
    Source,
    TensorInfo,
    open_source,
)
from automodel.ckpt.errors import CheckpointError
from automodel.ckpt.saving import write_checksums

__all__ = ["convert", "merge", "reshard"]

Progress = Callable[[int], None]


def merge(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    checksums: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Returns ``dst`` after consolidating checkpoint ``src`` into a Hugging Face folder there.

    ``src`` may be a DCP folder, per-rank sharded safetensors (DCP's HuggingFaceStorageWriter with
    ``save_distributed=True``), or any HF folder/file. ``config.json``, ``generation_config.json``,
    tokenizer files and the chat template are copied along. ``dst`` is written in a temporary
    sibling folder and renamed at the end, so it is never left half-written.

    Args:
        src: the checkpoint to read (never modified).
        dst: the folder to create.
        max_shard_size: largest output file, e.g. ``"5GB"``.
        dtype: cast floating-point tensors to this dtype.
        overwrite: replace ``dst`` when it exists (refused otherwise).
        checksums: also write a ``SHA256SUMS`` manifest that ``verify`` checks.
        progress: called with the number of bytes written after each step.

    Example:
        >>> import tempfile, torch
        >>> from automodel.ckpt import save, merge
        >>> src = save({"w": torch.ones(4)}, tempfile.mkdtemp(), format="dcp")
        >>> sorted(p.name for p in merge(src, tempfile.mkdtemp() + "/hf").iterdir())
        ['model.safetensors']
    """
    return _to_safetensors(
        Path(src),
        Path(dst),
        parse_size(max_shard_size),
        parse_dtype(dtype),
        overwrite,
        checksums,
        progress,
    )


def reshard(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    max_shard_size: int | str,
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    checksums: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Returns ``dst`` after rewriting ``src`` as a Hugging Face folder with files of at most
    ``max_shard_size`` (same behaviour and arguments as ``merge``).

    Example:
        >>> import tempfile, torch
        >>> from automodel.ckpt import save, reshard
        >>> src = save({"a": torch.ones(100), "b": torch.ones(100)}, tempfile.mkdtemp())
        >>> len(list(reshard(src, tempfile.mkdtemp() + "/r", max_shard_size=400).glob("*.safetensors")))
        2
    """
    return _to_safetensors(
        Path(src),
        Path(dst),
        parse_size(max_shard_size),
        parse_dtype(dtype),
        overwrite,
        checksums,
        progress,
    )


def convert(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    to: Literal["dcp", "safetensors"],
    max_shard_size: int | str = "5GB",
    dtype: torch.dtype | str | None = None,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> Path:
    """Returns ``dst`` after converting ``src`` to a DCP folder (``to="dcp"``) or a Hugging Face
    safetensors folder (``to="safetensors"``, same as ``merge``).

    Example:
        >>> import tempfile, torch
        >>> from automodel.ckpt import save, convert
        >>> src = save({"w": torch.ones(4)}, tempfile.mkdtemp())
        >>> (convert(src, tempfile.mkdtemp() + "/d", to="dcp") / ".metadata").is_file()
        True
    """
    cast = parse_dtype(dtype)
    if to == "safetensors":
        return _to_safetensors(
            Path(src), Path(dst), parse_size(max_shard_size), cast, overwrite, False, progress
        )
    if to != "dcp":
        raise CheckpointError(f"to={to!r} is not supported; use 'dcp' or 'safetensors'")
    return _to_dcp(Path(src), Path(dst), cast, overwrite, progress)


def _out_info(info: TensorInfo, dtype: torch.dtype | None) -> TensorInfo:
    if dtype is not None and info.dtype.is_floating_point:
        return TensorInfo(dtype, info.shape)
    return info


def _to_safetensors(
    src: Path,
    dst: Path,
    max_bytes: int,
    dtype: torch.dtype | None,
    overwrite: bool,
    checksums: bool,
    progress: Progress | None,
) -> Path:
    if dtype is not None:
        dtype_to_str(dtype)
    with open_source(src) as source:
        out = {n: _out_info(i, dtype) for n, i in source.tensors.items()}
        layout = plan_layout([(n, i.dtype, i.shape) for n, i in out.items()], max_bytes)
        check_destination(src, dst, overwrite=overwrite, needed_bytes=sum(layout.sizes))
        with staged_folder(dst) as tmp:
            for index in range(len(layout.files)):
                _write_file(source, layout, index, tmp, progress)
            write_index(tmp, layout)
            copy_side_files(src, tmp)
            if checksums:
                write_checksums(tmp)
    return dst


def _write_file(
    source: Source, layout: Layout, index: int, folder: Path, progress: Progress | None
) -> None:
    """Writes output file ``index`` of ``layout``: header, then each tensor from ``source``."""
    placed = layout.by_file(index)
    fd = os.open(folder / layout.files[index], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, layout.prefixes[index])
        os.ftruncate(fd, layout.sizes[index])
        batch: dict[str, torch.Tensor] = {}
        if isinstance(source, DCPSource):  # one dcp.load per output file: bounded by the file
            batch = source.read_many([t.name for t in placed])
        for tensor in placed:
            stored = source.tensors[tensor.name]
            if stored.dtype == tensor.dtype and isinstance(
                source, (SafetensorsSource, ShardedSafetensorsSource)
            ):
                _copy_stored_bytes(source, tensor.name, fd, tensor.offset)
            else:
                data = batch.pop(tensor.name) if batch else source.read(tensor.name)
                data = data.to(tensor.dtype).contiguous()
                pwrite_all(fd, tensor_bytes(data), tensor.offset)
                del data
            if progress is not None:
                progress(tensor.nbytes)
        os.fsync(fd)
    finally:
        os.close(fd)


def _copy_stored_bytes(source: Source, name: str, dst_fd: int, dst_offset: int) -> None:
    """Copies tensor ``name``'s bytes from its source file(s) into ``dst_fd`` without a round trip
    through Python memory."""
    if isinstance(source, SafetensorsSource):
        entry = source.entries[name]
        _copy_range(source.fd(entry.file), entry.begin, dst_fd, dst_offset, entry.nbytes)
        return
    assert isinstance(source, ShardedSafetensorsSource)
    shape = source.tensors[name].shape
    item = source.tensors[name].dtype.itemsize
    for entry, offsets in source.chunks[name]:
        src_fd = source.fd(entry.file)
        for full, local, length in contiguous_runs(shape, offsets, entry.shape):
            _copy_range(
                src_fd, entry.begin + local * item, dst_fd, dst_offset + full * item, length * item
            )


_HAS_COPY_FILE_RANGE = hasattr(os, "copy_file_range")


def _copy_range(src_fd: int, src_off: int, dst_fd: int, dst_off: int, count: int) -> None:
    global _HAS_COPY_FILE_RANGE
    while count > 0:
        if _HAS_COPY_FILE_RANGE:
            try:
                n = os.copy_file_range(src_fd, dst_fd, count, src_off, dst_off)
            except OSError:  # e.g. across some file systems: fall back to pread/pwrite
                _HAS_COPY_FILE_RANGE = False
                continue
        else:
            block = os.pread(src_fd, min(count, 64 << 20), src_off)
            n = len(block)
            if n:
                pwrite_all(dst_fd, memoryview(block), dst_off)
        if n == 0:
            raise CheckpointError(f"unexpected end of a source file at byte {src_off}; truncated?")
        src_off, dst_off, count = src_off + n, dst_off + n, count - n


def _to_dcp(
    src: Path, dst: Path, dtype: torch.dtype | None, overwrite: bool, progress: Progress | None
) -> Path:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import DefaultSavePlanner, FileSystemWriter

    with open_source(src) as source:
        out = {n: _out_info(i, dtype) for n, i in source.tensors.items()}
        needed = sum(i.nbytes for i in out.values())
        check_destination(src, dst, overwrite=overwrite, needed_bytes=needed)
        # DCP plans from shapes/dtypes; meta tensors stand in, and the planner fetches each real
        # tensor only when the writer asks for it, so one tensor is in memory at a time.
        placeholders = {
            n: torch.empty(i.shape, dtype=i.dtype, device="meta") for n, i in out.items()
        }

        class _StreamingPlanner(DefaultSavePlanner):
            def resolve_data(self, write_item: Any) -> Any:
                name = write_item.index.fqn
                data = source.read(name).to(out[name].dtype)
                if progress is not None:
                    progress(data.numel() * data.element_size())
                return data

        with staged_folder(dst) as tmp:
            with coll.quiet_single_process():
                dcp.save(
                    placeholders,
                    storage_writer=FileSystemWriter(str(tmp), single_file_per_rank=True),
                    planner=_StreamingPlanner(),
                    no_dist=True,
                )
            copy_side_files(src, tmp)
    return dst
