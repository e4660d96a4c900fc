"""``verify``: check that a checkpoint is complete and readable (and matches its sha256 manifest)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from automodel.ckpt._layout import CHECKSUMS_NAME
from automodel.ckpt._sources import SafetensorsSource, detect_format, open_source
from automodel.ckpt.errors import CheckpointError
from automodel.ckpt.saving import sha256_file

__all__ = ["VerifyReport", "verify"]


@dataclass
class VerifyReport:
    """What ``verify`` checked and every problem it found (``ok`` when there is none)."""

    path: str
    format: str
    tensors_checked: int = 0
    bytes_checked: int = 0
    checksums_checked: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, Any]:
        """Returns the report as a JSON-ready dict (with ``ok``)."""
        return {**asdict(self), "ok": self.ok}


def verify(
    path: str | os.PathLike[str], *, progress: Callable[[int], None] | None = None
) -> VerifyReport:
    """Returns a report on the checkpoint at ``path``: structure, readability and checksums.

    Checks that the index and the files agree (no missing file or tensor, no stale file), that every
    header is valid and every file holds all its bytes (no truncation), that every tensor can be
    read, and, when a ``SHA256SUMS`` manifest was written at save time, every file's sha256. Raises
    ``CheckpointError`` only when ``path`` is not a checkpoint at all.

    Example:
        >>> import tempfile, torch
        >>> from automodel.ckpt import save, verify
        >>> verify(save({"w": torch.ones(3)}, tempfile.mkdtemp(), checksums=True)).ok
        True
    """
    path = Path(path)
    report = VerifyReport(str(path), detect_format(path))
    try:
        source = open_source(path)
    except CheckpointError as e:
        report.problems.append(str(e))
        return report
    with source:
        if isinstance(source, SafetensorsSource) and source.index_file is not None:
            listed = {f.name for f in source.files}
            stale = sorted(f.name for f in path.glob("*.safetensors") if f.name not in listed)
            if stale:
                report.problems.append(
                    f"{path}: file(s) not in {source.index_file.name}: {', '.join(stale)} "
                    "(left over from another save?)"
                )
        for name, info in source.tensors.items():
            try:
                source.read(name)
            except (CheckpointError, OSError) as e:
                report.problems.append(f"tensor {name!r}: {e}")
                continue
            report.tensors_checked += 1
            report.bytes_checked += info.nbytes
            if progress is not None:
                progress(info.nbytes)
    manifest = (path if path.is_dir() else path.parent) / CHECKSUMS_NAME
    if manifest.is_file():
        for line in manifest.read_text().splitlines():
            if not line.strip():
                continue
            expected, _, name = line.partition("  ")
            file = manifest.parent / name.strip()
            if not file.is_file():
                report.problems.append(f"{CHECKSUMS_NAME} lists {name.strip()}, which is missing")
            elif sha256_file(file) != expected.strip():
                report.problems.append(
                    f"{file.name}: sha256 differs from {CHECKSUMS_NAME} (corrupted after save)"
                )
            else:
                report.checksums_checked += 1
    return report
