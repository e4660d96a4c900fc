"""Streaming pretraining data: text read lazily from files (or an HF streaming dataset), packed on the fly.

Nothing loads the whole corpus: JSONL and TXT files are read line by line from a byte offset,
Parquet files batch by batch from a row, ``hf:NAME`` through ``datasets``' streaming mode. Record
``k`` of an epoch goes to rank ``k % world_size``; each rank tokenizes its records, packs them into
``max_length`` rows (positions restart per document) and yields micro-batches forever, epoch after
epoch. The state — epoch, file, offset, record counter and the partly filled row — goes into the
checkpoint, so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from automodel.recipes.config import DataSection, DataSource
from automodel.recipes.data._chat import IGNORE_INDEX
from automodel.recipes.data._readers import DataError, data_files

STREAMABLE = (".jsonl", ".txt", ".parquet")
_PARQUET_BATCH = 1024


class StreamingBatches:
    """Yields this rank's micro-batches of packed text rows, read lazily, forever; resumes exactly.

    Example:
        >>> batches = StreamingBatches(DataSource(path="corpus/"), data, tok, 8, collate_fn)
        >>> first = next(iter(batches)); state = batches.state_dict()
    """

    def __init__(
        self,
        source: DataSource,
        data: DataSection,
        tokenizer: Any,
        batch_size: int,
        collate: Callable[[list[dict[str, list[int]]]], Any],
        *,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        log: Callable[[str], None] = print,
    ) -> None:
        if data.format != "text":
            raise DataError(
                f"data.streaming reads plain text for pretraining, not data.format="
                f"{data.format!r}; set data.format=text or data.streaming=false"
            )
        self.source, self.data, self.tokenizer = source, data, tokenizer
        self.batch_size, self.collate = batch_size, collate
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.log = log
        self.hf = source.path.startswith("hf:")
        self.files: list[Path] = [] if self.hf else data_files(Path(source.path))
        if not self.hf:
            bad = [f for f in self.files if f.suffix not in STREAMABLE]
            if bad:
                raise DataError(
                    f"data file {str(bad[0])!r} cannot be streamed; data.streaming reads "
                    f"{'/'.join(STREAMABLE)} files (convert it, or set data.streaming=false)"
                )
        self._hf_dataset: Any = None
        # Position: the next record to read. Row: the packed row being filled; ready: full rows.
        self.epoch, self.file, self.offset, self.line, self.record = 0, 0, 0, 0, 0
        self.row: dict[str, list[int]] = _empty_row()
        self.ready: list[dict[str, list[int]]] = []
        self.hf_state: dict[str, Any] | None = None
        self.skipped = {"malformed line": 0, "too long": 0, "truncated": 0}

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Returns the stream position (epoch, file, byte offset/row, record) and the partial row."""
        return {
            "epoch": self.epoch, "file": self.file, "offset": self.offset, "line": self.line,
            "record": self.record, "row": {k: list(v) for k, v in self.row.items()},
            "ready": [dict(r) for r in self.ready], "seed": self.seed,
            "hf_state": self._hf_dataset.state_dict() if self._hf_dataset is not None else None,
            "world_size": self.world_size,
        }  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continues from a position saved by :meth:`state_dict` (same data and world size).

        Raises:
            ValueError: the checkpoint was written with another number of data-parallel ranks.
        """
        if int(state["world_size"]) != self.world_size:
            raise ValueError(
                f"the streaming data position was saved with {state['world_size']} data-parallel "
                f"rank(s) but this run has {self.world_size}; resume with the same number of "
                "ranks, or start a new output_dir"
            )
        self.epoch, self.file = int(state["epoch"]), int(state["file"])
        self.offset, self.line = int(state["offset"]), int(state["line"])
        self.record = int(state["record"])
        self.row = {k: list(v) for k, v in state["row"].items()}
        self.ready = [dict(r) for r in state["ready"]]
        self.hf_state = state["hf_state"]

    # -- iteration ---------------------------------------------------------------------------

    def __iter__(self) -> Iterator[Any]:
        while True:
            fresh, used = self.record == 0 and not self.row["input_ids"], 0
            for record in self._records():
                mine = self.record % self.world_size == self.rank
                self.record += 1
                if not mine:
                    continue
                doc = self._document(record)
                if doc is None:
                    continue
                used += 1
                self._add(doc)
                while len(self.ready) >= self.batch_size:
                    rows, self.ready = self.ready[: self.batch_size], self.ready[self.batch_size :]
                    yield self.collate(rows)
            if fresh and used == 0:
                notes = ", ".join(f"{v} {k}" for k, v in self.skipped.items() if v)
                raise DataError(
                    f"{self.source.path}: no usable text records for data rank {self.rank} of "
                    f"{self.world_size} out of {self.record}"
                    + (f" ({notes})" if notes else "")
                    + "; add data, check data.text_column and data.max_length, or use fewer ranks"
                )
            if self.epoch == 0 and any(self.skipped.values()):
                notes = ", ".join(f"{v} {k}" for k, v in self.skipped.items() if v)
                self.log(
                    f"data {self.source.path} (streamed, rank {self.rank}): epoch 1 had {notes}"
                )
            self.epoch += 1
            self.file, self.offset, self.line, self.record = 0, 0, 0, 0
            self.hf_state = None
            self._hf_dataset = None

    def _add(self, doc: list[int]) -> None:
        """Appends a document to the current row (packing) or makes it a row; full rows go to ready."""
        labels = [*doc[1:], IGNORE_INDEX]
        if not self.data.packing:
            self.ready.append({"input_ids": doc, "labels": labels})
            return
        if self.row["input_ids"] and len(self.row["input_ids"]) + len(doc) > self.data.max_length:
            self.ready.append(self.row)
            self.row = _empty_row()
        self.row["input_ids"] += doc
        self.row["labels"] += labels
        self.row["position_ids"] += list(range(len(doc)))

    def _document(self, record: dict[str, Any]) -> list[int] | None:
        """Returns the token ids (+ EOS) of one record, truncated per data.truncation, or None."""
        text = record.get(self.data.text_column)
        if not isinstance(text, str):
            raise DataError(
                f"{self.source.path}: record {self.record} has no {self.data.text_column!r} text "
                f"(has: {', '.join(record)}); set data.text_column"
            )
        if not text.strip():
            return None
        ids = list(self.tokenizer(text, add_special_tokens=True)["input_ids"])
        if self.tokenizer.eos_token_id is not None:
            ids.append(self.tokenizer.eos_token_id)
        n, limit = len(ids), self.data.max_length
        if n <= limit:
            return ids
        if self.data.truncation == "error":
            raise DataError(
                f"{self.source.path}: record {self.record} has {n} tokens > data.max_length="
                f"{limit}; raise max_length or set data.truncation=right|drop"
            )
        self.skipped["too long" if self.data.truncation == "drop" else "truncated"] += 1
        return None if self.data.truncation == "drop" else ids[:limit]

    def _records(self) -> Iterator[dict[str, Any]]:
        """Yields records from the current position to the end of the epoch, advancing it."""
        limit = self.source.limit
        if self.hf:
            for record in self._hf_records():
                if limit is not None and self.record >= limit:
                    return
                yield record
            return
        order = self._file_order()
        while self.file < len(order):
            path = order[self.file]
            rows = (
                _parquet_rows(path, self.offset, [self.data.text_column])
                if path.suffix == ".parquet"
                else self._lines(path, self.offset, self.line)
            )
            for record, offset, line in rows:
                if limit is not None and self.record >= limit:
                    return
                self.offset, self.line = offset, line
                yield record
            self.file, self.offset, self.line = self.file + 1, 0, 0

    def _file_order(self) -> list[Path]:
        if not self.data.shuffle:
            return self.files
        gen = torch.Generator().manual_seed(self.seed + self.epoch)
        return [self.files[i] for i in torch.randperm(len(self.files), generator=gen).tolist()]

    def _lines(
        self, path: Path, offset: int, line: int
    ) -> Iterator[tuple[dict[str, Any], int, int]]:
        """Yields (record, byte offset after it, its line number) from a JSONL or TXT file."""
        try:
            f = path.open("rb")
        except OSError as e:
            raise DataError(f"data file {str(path)!r} cannot be read: {e}") from None
        with f:
            f.seek(offset)
            for raw in f:
                offset += len(raw)
                line += 1
                text = raw.decode("utf-8", errors="replace")
                if not text.strip():
                    continue
                if path.suffix == ".txt":
                    yield {self.data.text_column: text.rstrip("\r\n")}, offset, line
                    continue
                try:
                    row = json.loads(text)
                    if not isinstance(row, dict):
                        raise json.JSONDecodeError("expected a JSON object", text, 0)
                except json.JSONDecodeError as e:
                    if self.data.on_bad_line == "skip":
                        self.skipped["malformed line"] += 1
                        continue
                    raise DataError(
                        f"{path}:{line}: malformed JSONL line ({e.msg}); fix it or set "
                        "data.on_bad_line=skip"
                    ) from None
                yield row, offset, line

    def _hf_records(self) -> Iterator[dict[str, Any]]:
        try:
            import datasets
        except ImportError:
            raise DataError(
                f"{self.source.path}: Hugging Face datasets need `pip install "
                "automodel-recipes[datasets]`"
            ) from None
        ds = datasets.load_dataset(self.source.path[3:], split=self.source.split, streaming=True)
        if self.hf_state is not None:
            ds.load_state_dict(self.hf_state)
        self._hf_dataset = ds
        yield from ds


def _parquet_rows(
    path: Path, row: int, columns: list[str]
) -> Iterator[tuple[dict[str, Any], int, int]]:
    """Yields (record, index of the next row, 0) from a Parquet file, batch by batch from ``row``."""
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: reading Parquet needs pyarrow; `pip install pyarrow` or convert to JSONL"
        ) from None
    pf = pq.ParquetFile(path)
    start, first_group = 0, 0
    for g in range(pf.num_row_groups):
        n = pf.metadata.row_group(g).num_rows
        if start + n > row:
            break
        start, first_group = start + n, g + 1
    groups = list(range(first_group, pf.num_row_groups))
    if not groups:
        return
    index = start
    for batch in pf.iter_batches(batch_size=_PARQUET_BATCH, row_groups=groups, columns=columns):
        for record in batch.to_pylist():
            index += 1
            if index > row:
                yield record, index, 0


def _empty_row() -> dict[str, list[int]]:
    return {"input_ids": [], "labels": [], "position_ids": []}
