"""Safe output folders for the offline tools: refuse to overwrite or nest in the source, check free
disk space before writing, write into a sibling temporary folder and rename it into place at the end."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from automodel.ckpt.errors import CheckpointError

# Files next to the weights that a Hugging Face folder needs (config, tokenizer, chat template...):
# everything that is not a weight/index/training-state file is carried over.
_WEIGHT_SUFFIXES = (".safetensors", ".distcp", ".bin", ".pt", ".pth", ".ckpt")
_NOT_CARRIED = {".metadata", "SHA256SUMS", "checkpoint.json", "latest"}


def check_destination(src: Path, dst: Path, *, overwrite: bool, needed_bytes: int) -> None:
    """Raises ``CheckpointError`` unless ``dst`` may be written from ``src`` with ``needed_bytes``."""
    src_r, dst_r = src.resolve(), dst.resolve()
    if dst_r.is_relative_to(src_r):
        raise CheckpointError(
            f"destination {dst} is inside the source {src}; choose a folder outside it"
        )
    if src_r.is_relative_to(dst_r):
        raise CheckpointError(
            f"destination {dst} contains the source {src}; writing it would destroy the source"
        )
    if dst.exists() and not overwrite:
        raise CheckpointError(
            f"destination {dst} exists; pass overwrite=True (--overwrite) to replace it"
        )
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"destination {dst} is a file; expected a folder")
    parent = dst_r.parent
    while not parent.exists():
        parent = parent.parent
    free = shutil.disk_usage(parent).free
    if needed_bytes > free:
        raise CheckpointError(
            f"not enough free disk for {dst}: needs {needed_bytes / 1e9:.2f} GB, "
            f"{free / 1e9:.2f} GB free; free space or choose another destination"
        )


@contextmanager
def staged_folder(dst: Path) -> Iterator[Path]:
    """Yields a temporary sibling of ``dst`` to write into; on success it replaces ``dst``."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dst.exists():
        old = dst.with_name(f".{dst.name}.old-{os.getpid()}")
        os.rename(dst, old)
        os.rename(tmp, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, dst)


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copies config, generation config, tokenizer and chat-template files; returns their names."""
    if not src.is_dir():
        return []
    copied = []
    for path in sorted(src.iterdir()):
        if (
            path.is_file()
            and not path.name.endswith(_WEIGHT_SUFFIXES)
            and not path.name.endswith(".index.json")
            and path.name not in _NOT_CARRIED
            and not path.name.startswith(".")
        ):
            shutil.copy2(path, dst / path.name)
            copied.append(path.name)
    return copied
