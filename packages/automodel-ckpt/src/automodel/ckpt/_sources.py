"""Read-only views of a checkpoint on disk, whatever its format, with slice-wise tensor reads.

Three formats are recognized from a path:

- ``safetensors``: a Hugging Face folder (``model.safetensors`` or shards + ``*.safetensors.index.json``)
  or a single ``.safetensors`` file.
- ``sharded-safetensors``: per-rank files written by DCP's ``HuggingFaceStorageWriter`` with
  ``save_distributed=True`` (``shard-00001-model-00001-of-00001.safetensors``, each header carrying
  ``DCP_SHARDING_INFO`` offsets); a tensor is spread over several files.
- ``dcp``: a ``torch.distributed.checkpoint`` folder (``.metadata`` + ``*.distcp``), read via DCP.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from automodel.ckpt import _collective as coll
from automodel.ckpt._format_detection import detect_format
from automodel.ckpt._safetensors_format import TensorEntry, read_header, read_region
from automodel.ckpt.errors import CheckpointError

_SHARDING_KEY = "DCP_SHARDING_INFO"


@dataclass(frozen=True)
class TensorInfo:
    """The dtype and full shape of one stored tensor."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


class Source:
    """A checkpoint opened for reading: ``tensors`` (name -> TensorInfo, in file order) and ``read``."""

    format: str
    path: Path
    files: list[Path]
    tensors: dict[str, TensorInfo]

    def read(
        self, name: str, offsets: Sequence[int] | None = None, sizes: Sequence[int] | None = None
    ) -> torch.Tensor:
        """Returns tensor ``name`` (or its chunk ``[offsets, offsets + sizes)``) in its stored dtype."""
        raise NotImplementedError

    def close(self) -> None:
        """Releases open files."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _FdCache:
    def __init__(self) -> None:
        self._fds: dict[Path, int] = {}

    def get(self, path: Path) -> int:
        if path not in self._fds:
            self._fds[path] = os.open(path, os.O_RDONLY)
        return self._fds[path]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


class SafetensorsSource(Source):
    """A Hugging Face safetensors folder or file; ``entries`` gives each tensor's file and bytes."""

    format = "safetensors"

    def __init__(self, path: Path) -> None:
        self.path = path
        self.index_file: Path | None = None
        self.index_metadata: dict[str, object] = {}
        self.file_metadata: dict[Path, dict[str, str]] = {}
        if path.is_file():
            self.files = [path]
            self.entries = self._read_headers(self.files)
        else:
            indexes = sorted(path.glob("*.safetensors.index.json"))
            if indexes:
                self.index_file = indexes[0]
                self.entries = self._read_index(self.index_file)
            else:
                self.files = sorted(path.glob("*.safetensors"))
                self.entries = self._read_headers(self.files)
        self.tensors = {n: TensorInfo(e.dtype, e.shape) for n, e in self.entries.items()}
        self._fds = _FdCache()

    def _read_headers(self, files: list[Path]) -> dict[str, TensorEntry]:
        entries: dict[str, TensorEntry] = {}
        for file in files:
            header = read_header(file)
            self.file_metadata[file] = header.metadata
            for name, entry in header.tensors.items():
                if name in entries:
                    raise CheckpointError(
                        f"{self.path}: tensor {name!r} is stored twice ({entries[name].file.name} "
                        f"and {file.name}); keep one copy"
                    )
                entries[name] = entry
        return entries

    def _read_index(self, index_file: Path) -> dict[str, TensorEntry]:
        try:
            index = json.loads(index_file.read_text())
            weight_map: dict[str, str] = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(
                f"{index_file}: corrupt index ({e}); expected JSON with a 'weight_map' object"
            ) from None
        self.index_metadata = index.get("metadata") or {}
        names = sorted(set(weight_map.values()))
        missing = [n for n in names if not (self.path / n).is_file()]
        if missing:
            raise CheckpointError(
                f"{index_file} names file(s) that do not exist: {', '.join(missing)}; "
                "the checkpoint is incomplete"
            )
        self.files = [self.path / n for n in names]
        found = self._read_headers(self.files)
        absent = [t for t, f in weight_map.items() if t not in found or found[t].file.name != f]
        if absent:
            shown = ", ".join(f"{t!r} (in {weight_map[t]})" for t in absent[:5])
            raise CheckpointError(
                f"{index_file} names {len(absent)} tensor(s) its files do not hold: {shown}"
                f"{' ...' if len(absent) > 5 else ''}; the checkpoint is incomplete or mismatched"
            )
        extra = sorted(set(found) - set(weight_map))
        if extra:
            raise CheckpointError(
                f"{index_file} does not list {len(extra)} tensor(s) present in its files, e.g. "
                f"{extra[0]!r}; the index is stale"
            )
        return {t: found[t] for t in sorted(found, key=lambda t: (found[t].file, found[t].begin))}

    def fd(self, path: Path) -> int:
        """Returns an open read-only descriptor of ``path`` (cached until ``close``)."""
        return self._fds.get(path)

    def read(self, name, offsets=None, sizes=None):  # type: ignore[no-untyped-def]
        entry = self.entries[name]
        return read_region(self._fds.get(entry.file), entry, offsets, sizes)

    def close(self) -> None:
        self._fds.close()


class ShardedSafetensorsSource(Source):
    """Per-rank safetensors files written by DCP's HuggingFaceStorageWriter(save_distributed=True)."""

    format = "sharded-safetensors"

    def __init__(self, path: Path, files: list[Path]) -> None:
        self.path = path
        self.files = files
        self.chunks: dict[str, list[tuple[TensorEntry, tuple[int, ...]]]] = {}
        for file in files:
            header = read_header(file)
            try:
                sharding = json.loads(header.metadata[_SHARDING_KEY])
            except (KeyError, ValueError):
                raise CheckpointError(
                    f"{file}: no valid {_SHARDING_KEY} metadata; mixed per-rank and plain files"
                ) from None
            for name, entry in header.tensors.items():
                offsets = tuple(sharding[name]["saved_offsets"])
                self.chunks.setdefault(name, []).append((entry, offsets))
        self.tensors = {}
        for name, chunks in self.chunks.items():
            ndim = len(chunks[0][0].shape)
            shape = tuple(max(e.shape[d] + o[d] for e, o in chunks) for d in range(ndim))
            covered = sum(e.numel for e, _ in chunks)
            if covered != math.prod(shape):
                raise CheckpointError(
                    f"{path}: tensor {name!r} is incomplete: its shards hold {covered} of "
                    f"{math.prod(shape)} elements; a rank's file is missing"
                )
            self.tensors[name] = TensorInfo(chunks[0][0].dtype, shape)
        self._fds = _FdCache()

    def fd(self, path: Path) -> int:
        """Returns an open read-only descriptor of ``path`` (cached until ``close``)."""
        return self._fds.get(path)

    def read(self, name, offsets=None, sizes=None):  # type: ignore[no-untyped-def]
        info = self.tensors[name]
        full = torch.empty(info.shape, dtype=info.dtype)
        for entry, chunk_offsets in self.chunks[name]:
            part = read_region(self._fds.get(entry.file), entry)
            index = tuple(slice(o, o + s) for o, s in zip(chunk_offsets, entry.shape))
            full[index] = part
        if offsets is None or sizes is None:
            return full
        return full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))].contiguous()

    def close(self) -> None:
        self._fds.close()


class DCPSource(Source):
    """A torch.distributed.checkpoint folder; tensors are read one at a time through DCP."""

    format = "dcp"

    def __init__(self, path: Path) -> None:
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path = path
        self.files = sorted(path.glob("*.distcp"))
        try:
            metadata = FileSystemReader(str(path)).read_metadata()
        except Exception as e:
            raise CheckpointError(
                f"{path}: unreadable DCP metadata ({type(e).__name__}: {e}); the checkpoint is corrupt"
            ) from None
        self.tensors = {}
        self.non_tensors: list[str] = []
        for name, md in metadata.state_dict_metadata.items():
            if isinstance(md, TensorStorageMetadata):
                self.tensors[name] = TensorInfo(md.properties.dtype, tuple(md.size))
            else:
                self.non_tensors.append(name)

    def read(self, name, offsets=None, sizes=None):  # type: ignore[no-untyped-def]
        full = self.read_many([name])[name]
        if offsets is None or sizes is None:
            return full
        return full[tuple(slice(o, o + s) for o, s in zip(offsets, sizes))].contiguous()

    def read_many(self, names: list[str]) -> dict[str, torch.Tensor]:
        """Returns the full tensors ``names``, read with one ``dcp.load`` call."""
        import torch.distributed.checkpoint as dcp

        out = {n: torch.empty(self.tensors[n].shape, dtype=self.tensors[n].dtype) for n in names}
        try:
            with coll.quiet_single_process():
                dcp.load(out, checkpoint_id=str(self.path), no_dist=True)
        except Exception as e:
            raise CheckpointError(
                f"{self.path}: cannot read tensors {names[:3]} ({type(e).__name__}: {e}); "
                "the checkpoint is corrupt or incomplete"
            ) from None
        return out


def open_source(path: str | Path) -> Source:
    """Returns the checkpoint at ``path`` opened for reading (format detected from its files)."""
    path = Path(path)
    fmt = detect_format(path)
    if fmt == "dcp":
        return DCPSource(path)
    if fmt == "sharded-safetensors":
        folder = path if list(path.glob("shard-*.safetensors")) else path / "sharded"
        return ShardedSafetensorsSource(path, sorted(folder.glob("shard-*.safetensors")))
    return SafetensorsSource(path)
