"""The safetensors file layout: header parsing with validation, header encoding, and region reads.

A safetensors file is ``u64 little-endian header length | JSON header | tensor bytes``. The header
maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}`` (offsets relative to the
end of the header) plus an optional ``"__metadata__"`` dict of strings. We parse it ourselves (instead
of ``safe_open``) to read arbitrary slices with ``pread`` (no mmap: file pages would count in RSS),
to write files whose layout every rank can compute independently, and to report corrupt files by name.
"""

from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import product
from pathlib import Path
from typing import Any

import torch

from automodel.ckpt.errors import CheckpointError

_DTYPE_NAMES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in [
    ("F8_E4M3", "float8_e4m3fn"),
    ("F8_E5M2", "float8_e5m2"),
    ("U16", "uint16"),
    ("U32", "uint32"),
    ("U64", "uint64"),
]:
    if hasattr(torch, _attr):
        _DTYPE_NAMES[_name] = getattr(torch, _attr)
_NAMES_BY_DTYPE = {dtype: name for name, dtype in _DTYPE_NAMES.items()}

_MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit


def dtype_to_str(dtype: torch.dtype) -> str:
    """Returns the safetensors dtype string (``"BF16"``...) for ``dtype``."""
    if dtype not in _NAMES_BY_DTYPE:
        raise CheckpointError(
            f"dtype {dtype} cannot be stored in safetensors; expected one of "
            f"{sorted(str(d) for d in _NAMES_BY_DTYPE)}"
        )
    return _NAMES_BY_DTYPE[dtype]


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype | None:
    """Returns the torch dtype named by ``dtype`` (``"bf16"``, ``"bfloat16"``, ``torch.float32``...)."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    aliases = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16"}
    name = aliases.get(dtype.lower(), dtype.lower()).removeprefix("torch.")
    found = getattr(torch, name, None)
    if not isinstance(found, torch.dtype) or found not in _NAMES_BY_DTYPE:
        if dtype.upper() in _DTYPE_NAMES:
            return _DTYPE_NAMES[dtype.upper()]
        raise CheckpointError(
            f"unsupported dtype {dtype!r}; expected one of float32, bfloat16, float16, "
            "float64 (or fp32/bf16/fp16)"
        )
    return found


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: its file, dtype, shape and absolute byte range in that file."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class SafetensorsHeader:
    """The parsed header of one safetensors file (tensors in file order)."""

    path: Path
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]
    data_start: int
    file_size: int


def read_header(path: str | Path) -> SafetensorsHeader:
    """Returns the validated header of the safetensors file ``path``.

    Raises ``CheckpointError`` naming the file for: a file shorter than its header, a header that is
    not JSON, an unknown dtype, a tensor whose byte range disagrees with its shape, overlapping or
    gapped data, and a file shorter than its last tensor (truncated).
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw_len = f.read(8)
        if len(raw_len) < 8:
            raise CheckpointError(f"{path}: not a safetensors file (only {size} bytes)")
        (header_len,) = struct.unpack("<Q", raw_len)
        if header_len > _MAX_HEADER_BYTES or 8 + header_len > size:
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors header (header length {header_len}, "
                f"file size {size}); re-save or re-download the file"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise CheckpointError(
            f"{path}: corrupt safetensors header ({e}); re-save or re-download the file"
        ) from None
    data_start = 8 + header_len
    metadata = header.pop("__metadata__", None) or {}
    tensors: dict[str, TensorEntry] = {}
    for name, info in header.items():
        try:
            dtype_name, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}") from None
        if dtype_name not in _DTYPE_NAMES:
            raise CheckpointError(
                f"{path}: tensor {name!r} has unsupported dtype {dtype_name!r}; "
                f"expected one of {sorted(_DTYPE_NAMES)}"
            )
        dtype = _DTYPE_NAMES[dtype_name]
        expected = math.prod(shape) * dtype.itemsize
        if end - begin != expected or begin < 0:
            raise CheckpointError(
                f"{path}: tensor {name!r} occupies {end - begin} bytes but its shape {shape} "
                f"and dtype {dtype_name} need {expected}; the file is corrupt"
            )
        tensors[name] = TensorEntry(
            name, path, dtype, tuple(shape), data_start + begin, data_start + end
        )
    ordered = sorted(tensors.values(), key=lambda e: (e.begin, e.end))
    cursor = data_start
    for entry in ordered:
        if entry.begin != cursor:
            raise CheckpointError(
                f"{path}: tensor {entry.name!r} starts at byte {entry.begin} but the previous "
                f"data ends at {cursor} (overlap or gap); the file is corrupt"
            )
        cursor = entry.end
    if cursor > size:
        raise CheckpointError(
            f"{path}: truncated: its tensors need {cursor} bytes but the file has {size}; "
            "re-save or re-download it"
        )
    return SafetensorsHeader(
        path,
        dict(sorted(tensors.items(), key=lambda kv: kv[1].begin)),
        {str(k): str(v) for k, v in metadata.items()},
        data_start,
        size,
    )


def encode_header(
    tensors: Iterable[tuple[str, torch.dtype, Sequence[int]]], metadata: dict[str, str]
) -> tuple[bytes, list[int]]:
    """Returns (the bytes before the data, each tensor's absolute start offset) for a new file.

    Tensors are laid out back to back in the given order; the JSON is space-padded so the data
    starts at a multiple of 8 bytes, as the safetensors library does.
    """
    header: dict[str, object] = {"__metadata__": dict(metadata)}
    cursor = 0
    relative: list[int] = []
    for name, dtype, shape in tensors:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {
            "dtype": dtype_to_str(dtype),
            "shape": list(shape),
            "data_offsets": [cursor, cursor + nbytes],
        }
        relative.append(cursor)
        cursor += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-(8 + len(raw)) % 8)
    prefix = struct.pack("<Q", len(raw)) + raw
    return prefix, [len(prefix) + r for r in relative]


def contiguous_runs(
    shape: Sequence[int], offsets: Sequence[int], sizes: Sequence[int]
) -> Iterator[tuple[int, int, int]]:
    """Yields (element offset in the full tensor, element offset in the chunk, length) per run.

    A chunk ``[offsets, offsets + sizes)`` of a row-major tensor of ``shape`` is a set of
    contiguous runs in both the full tensor and the (contiguous) chunk; a row-wise shard is one run.
    """
    ndim = len(shape)
    if ndim == 0:
        yield 0, 0, 1
        return
    if any(s == 0 for s in sizes):
        return
    full_strides = [math.prod(shape[i + 1 :]) for i in range(ndim)]
    chunk_strides = [math.prod(sizes[i + 1 :]) for i in range(ndim)]
    split = ndim - 1  # the outermost dim inside a run: dims after it are complete
    while split > 0 and sizes[split] == shape[split]:
        split -= 1
    run = sizes[split] * full_strides[split]
    inner = offsets[split] * full_strides[split]
    for index in product(*(range(sizes[i]) for i in range(split))):
        full = inner + sum((offsets[i] + index[i]) * full_strides[i] for i in range(split))
        local = sum(index[i] * chunk_strides[i] for i in range(split))
        yield full, local, run


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """Returns a writable byte view of a contiguous CPU tensor (no copy)."""
    assert tensor.is_contiguous() and tensor.device.type == "cpu"
    if tensor.numel() == 0:
        return memoryview(bytearray())
    flat = tensor.reshape(-1)
    if flat.dtype == torch.bool:
        flat = flat.view(torch.uint8)
    array: Any = flat.view(torch.uint8).numpy()
    return memoryview(array).cast("B")


def read_region(
    fd: int,
    entry: TensorEntry,
    offsets: Sequence[int] | None = None,
    sizes: Sequence[int] | None = None,
) -> torch.Tensor:
    """Returns the chunk ``[offsets, offsets + sizes)`` of ``entry`` (the whole tensor by default).

    Reads only the bytes of the chunk with ``pread`` from the open file ``fd``.
    """
    if offsets is None or sizes is None:
        offsets, sizes = [0] * len(entry.shape), list(entry.shape)
    out = torch.empty(tuple(sizes), dtype=entry.dtype)
    buf = tensor_bytes(out)
    item = entry.dtype.itemsize
    for full, local, length in contiguous_runs(entry.shape, offsets, sizes):
        _pread_into(
            fd, buf[local * item : (local + length) * item], entry.begin + full * item, entry.file
        )
    return out


def _pread_into(fd: int, view: memoryview, offset: int, path: Path) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            raise CheckpointError(
                f"{path}: truncated: unexpected end of file at byte {offset + done}"
            )
        done += n


def pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    """Writes all of ``view`` at ``offset`` of ``fd`` (``pwrite`` may write less per call)."""
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)
