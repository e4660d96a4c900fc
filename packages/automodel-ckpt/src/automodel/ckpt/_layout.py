"""Where each tensor goes in a Hugging Face sharded checkpoint: file names, offsets and the index.

The layout is a pure function of the tensors' names, dtypes and shapes, so every rank computes the
same one and can write its slices straight into the final files.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from automodel.ckpt._safetensors_format import encode_header

INDEX_NAME = "model.safetensors.index.json"
SINGLE_FILE_NAME = "model.safetensors"
CHECKSUMS_NAME = "SHA256SUMS"
HF_METADATA = {"format": "pt"}


@dataclass(frozen=True)
class PlacedTensor:
    """A tensor's output file (index into ``Layout.files``) and absolute byte offset."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    file: int
    offset: int

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class Layout:
    """Output files (names, header bytes, total sizes) and the placement of every tensor."""

    files: list[str]
    prefixes: list[bytes]
    sizes: list[int]
    tensors: dict[str, PlacedTensor] = field(default_factory=dict)

    def by_file(self, index: int) -> list[PlacedTensor]:
        """Returns the tensors of file ``index`` in byte order."""
        return [t for t in self.tensors.values() if t.file == index]

    @property
    def total_tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def shard_file_name(index: int, count: int) -> str:
    """Returns the transformers shard name ``model-0000i-of-0000N.safetensors`` (1-based ``index``)."""
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def plan_layout(
    tensors: Sequence[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int
) -> Layout:
    """Returns the layout that packs ``tensors`` in order into files of at most ``max_shard_bytes``.

    As in transformers, a tensor larger than the limit gets a file of its own; one file is named
    ``model.safetensors`` and gets no index.
    """
    groups: list[list[tuple[str, torch.dtype, tuple[int, ...]]]] = [[]]
    current = 0
    for spec in tensors:
        nbytes = math.prod(spec[2]) * spec[1].itemsize
        if groups[-1] and current + nbytes > max_shard_bytes:
            groups.append([])
            current = 0
        groups[-1].append(spec)
        current += nbytes
    names = (
        [SINGLE_FILE_NAME]
        if len(groups) == 1
        else [shard_file_name(i + 1, len(groups)) for i in range(len(groups))]
    )
    layout = Layout(files=names, prefixes=[], sizes=[])
    for index, group in enumerate(groups):
        prefix, offsets = encode_header(group, HF_METADATA)
        layout.prefixes.append(prefix)
        size = len(prefix)
        for (name, dtype, shape), offset in zip(group, offsets):
            layout.tensors[name] = PlacedTensor(name, dtype, tuple(shape), index, offset)
            size = offset + math.prod(shape) * dtype.itemsize
        layout.sizes.append(size)
    return layout


def create_files(folder: Path, layout: Layout) -> None:
    """Creates every output file at its final size with its header written (data still zero)."""
    for name, prefix, size in zip(layout.files, layout.prefixes, layout.sizes):
        fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, prefix)
            os.ftruncate(fd, size)
        finally:
            os.close(fd)


def write_index(folder: Path, layout: Layout) -> None:
    """Writes ``model.safetensors.index.json`` when the layout has several files."""
    if len(layout.files) == 1:
        return
    index = {
        "metadata": {"total_size": layout.total_tensor_bytes},
        "weight_map": {t.name: layout.files[t.file] for t in layout.tensors.values()},
    }
    write_text_durably(folder / INDEX_NAME, json.dumps(index, indent=2) + "\n")


def remove_stale_weights(folder: Path, keep: Sequence[str]) -> None:
    """Deletes weight files and index of an earlier save in ``folder`` that ``keep`` does not name."""
    for path in [*folder.glob("model*.safetensors"), folder / INDEX_NAME, folder / CHECKSUMS_NAME]:
        if path.name not in keep and path.is_file():
            path.unlink()


def write_text_durably(path: Path, text: str) -> None:
    """Writes ``text`` to ``path`` through a temporary file, fsync and rename (never half-written)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
