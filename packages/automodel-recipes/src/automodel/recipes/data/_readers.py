"""Reads raw records from JSONL/JSON/Parquet/TXT files, folders of them, or `hf:` datasets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from automodel.recipes.config import DataSource

_SUFFIXES = (".jsonl", ".json", ".parquet", ".txt")


class DataError(ValueError):
    """The data cannot be used as configured; the message names the file (and line) and the fix."""


def read_records(
    source: DataSource, on_bad_line: str = "error"
) -> tuple[list[dict[str, Any]], int]:
    """Returns (records, number of malformed lines skipped) from a data source.

    Args:
        source: ``path`` is a file, a folder (every supported file in it, sorted), or ``hf:name``.
        on_bad_line: ``"error"`` raises on a malformed JSONL line; ``"skip"`` counts and skips it.

    Raises:
        DataError: missing/unreadable file, unsupported format, malformed line (file:line).
    """
    if source.path.startswith("hf:"):
        records = _read_hf(source.path[3:], source.split)
        skipped = 0
    else:
        records, skipped = [], 0
        for file in data_files(Path(source.path)):
            got, bad = _read_file(file, on_bad_line)
            records.extend(got)
            skipped += bad
    if source.limit is not None:
        records = records[: source.limit]
    return records, skipped


def data_files(path: Path) -> list[Path]:
    """Returns the data files at ``path``: the file itself, or a folder's supported files, sorted.

    Raises:
        DataError: the path does not exist, holds no data files, or has an unsupported suffix.
    """
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.suffix in _SUFFIXES)
        if not files:
            raise DataError(f"data folder {str(path)!r} holds no {'/'.join(_SUFFIXES)} files")
        return files
    if not path.exists():
        raise DataError(f"data file {str(path)!r} does not exist; check data.*.path")
    if path.suffix not in _SUFFIXES:
        raise DataError(
            f"data file {str(path)!r}: unsupported format {path.suffix!r}; expected one of "
            f"{', '.join(_SUFFIXES)}"
        )
    return [path]


def _read_file(path: Path, on_bad_line: str) -> tuple[list[dict[str, Any]], int]:
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise DataError(
                f"{path}: reading Parquet needs pyarrow; `pip install pyarrow` or convert to JSONL"
            ) from None
        return pq.read_table(path).to_pylist(), 0
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"data file {str(path)!r} cannot be read: {e}") from None
    if path.suffix == ".txt":
        return [{"text": line} for line in text.splitlines() if line.strip()], 0
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
        if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
            raise DataError(f"{path}: expected a JSON list of objects")
        return data, 0
    records, bad = [], 0
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise json.JSONDecodeError("expected a JSON object", line, 0)
        except json.JSONDecodeError as e:
            if on_bad_line == "skip":
                bad += 1
                continue
            raise DataError(
                f"{path}:{lineno}: malformed JSONL line ({e.msg}); fix it or set "
                "data.on_bad_line=skip"
            ) from None
        records.append(row)
    return records, bad


def _read_hf(name: str, split: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise DataError(
            f"hf:{name}: Hugging Face datasets need `pip install automodel-recipes[datasets]`"
        ) from None
    return list(datasets.load_dataset(name, split=split))
