"""Streaming pretraining data: lazy reads, on-the-fly packing, rank sharding, exact resume."""

from __future__ import annotations

import itertools
import json
import re
from pathlib import Path

import pytest

from automodel.recipes.config import ConfigError, DataSection, DataSource, load_config
from automodel.recipes.data import DataError, StreamingBatches, collate, cu_seqlens


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _doc(i: int) -> str:
    return f"doc {i} " + "the fox " * (i % 4)


def _corpus(folder: Path) -> Path:
    """Writes 30 documents over three formats: a.txt (0-9), b.jsonl (10-19), c.parquet (20-29)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder.mkdir()
    (folder / "a.txt").write_text("".join(_doc(i) + "\n\n" for i in range(10)))
    lines = [json.dumps({"text": _doc(i)}) for i in range(10, 15)]
    lines += ["{not json", *[json.dumps({"text": _doc(i)}) for i in range(15, 20)]]
    (folder / "b.jsonl").write_text("\n".join(lines) + "\n")
    table = pa.table({"text": [_doc(i) for i in range(20, 30)], "id": list(range(20, 30))})
    pq.write_table(table, folder / "c.parquet", row_group_size=3)
    return folder


def _doc_ids(batch, tokenizer) -> list[int]:
    """Returns the document numbers packed in a batch, row by row, split at position restarts."""
    out = []
    for ids, pos in zip(batch["input_ids"].tolist(), batch["position_ids"].tolist()):
        bounds = cu_seqlens(pos)
        for start, end in itertools.pairwise(bounds):
            text = tokenizer.decode(ids[start:end], skip_special_tokens=True)
            if not text.strip():  # padding
                continue
            out.append(int(re.match(r"doc (\d+)", text.strip()).group(1)))
    return out


def test_streaming_packs_shards_by_rank_and_resumes_exactly(tmp_path: Path, tokenizer):
    corpus = _corpus(tmp_path / "corpus")
    data = DataSection(format="text", streaming=True, packing=True, max_length=24,
                       shuffle=False, on_bad_line="skip")  # fmt: skip
    notes: list[str] = []

    def make(rank: int) -> StreamingBatches:
        return StreamingBatches(
            DataSource(path=str(corpus)), data, tokenizer, 2, lambda r: collate(r, 0),
            rank=rank, world_size=2, log=notes.append,
        )  # fmt: skip

    per_rank = []
    for rank in (0, 1):
        it = iter(make(rank))
        batches = [next(it) for _ in range(5)]  # > one epoch of this rank's 15 documents
        for b in batches:
            assert b["input_ids"].shape[1] <= 24 and "attention_mask" not in b
        per_rank.append([d for b in batches for d in _doc_ids(b, tokenizer)])
    # Record k of the stream (all files in order, the malformed line skipped) goes to rank k % 2.
    first_epoch = [d for d in per_rank[0] if d < 30][:15]
    assert first_epoch == list(range(0, 30, 2))
    assert [d for d in per_rank[1] if d < 30][:15] == list(range(1, 30, 2))
    assert any("1 malformed line" in n for n in notes), notes

    # Resume mid-epoch, with a partly filled row: the same batches, across the epoch boundary.
    ref = make(0)
    it = iter(ref)
    for _ in range(3):
        next(it)
    state = ref.state_dict()
    assert state["row"]["input_ids"], "the test should cut inside a packed row"
    expected = [_doc_ids(next(it), tokenizer) for _ in range(5)]
    again = make(0)
    again.load_state_dict(state)
    it2 = iter(again)
    assert [_doc_ids(next(it2), tokenizer) for _ in range(5)] == expected
    assert again.epoch >= 1
    other = StreamingBatches(DataSource(path=str(corpus)), data, tokenizer, 2, lambda r: r)
    with pytest.raises(ValueError, match="saved with 2 data-parallel rank"):
        other.load_state_dict(state)


def test_streaming_reads_lazily_and_reports_bad_input(tmp_path: Path, tokenizer):
    # A malformed line late in a file is only met when the stream gets there: reads are lazy.
    path = tmp_path / "big.jsonl"
    path.write_text("".join(json.dumps({"text": _doc(i)}) + "\n" for i in range(40)) + "{bad\n")
    data = DataSection(format="text", streaming=True, packing=True, max_length=32)
    batches = StreamingBatches(DataSource(path=str(path)), data, tokenizer, 1, lambda r: r)
    it = iter(batches)
    assert next(it) and batches.line < 40
    with pytest.raises(DataError, match=r"big.jsonl:41: malformed JSONL line"):
        for _ in range(100):
            next(it)

    (tmp_path / "x.json").write_text("[]")
    with pytest.raises(DataError, match=r"x.json.*cannot be streamed"):
        StreamingBatches(DataSource(path=str(tmp_path / "x.json")), data, tokenizer, 1, list)
    with pytest.raises(DataError, match=r"reads plain text for pretraining"):
        StreamingBatches(
            DataSource(path=str(path)), DataSection(streaming=True), tokenizer, 1, list
        )
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match=r"no usable text records for data rank 0 of 1"):
        next(iter(StreamingBatches(DataSource(path=str(empty)), data, tokenizer, 1, list)))
    raw = {"recipe": "sft", "model": {"name_or_path": "m"}, "training": {"output_dir": "o"},
           "data": {"streaming": True, "train": {"path": "d.jsonl"}}}  # fmt: skip
    with pytest.raises(ConfigError, match=r"data.streaming: only the pretrain recipe streams"):
        load_config(raw)


def test_streaming_an_hf_dataset_resumes_from_its_state(tmp_path: Path, tokenizer):
    """`hf:NAME` streams through `datasets` (a local folder here: offline); its state resumes."""
    pytest.importorskip("datasets")
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "train.jsonl").write_text(
        "".join(json.dumps({"text": _doc(i)}) + "\n" for i in range(20))
    )
    data = DataSection(format="text", streaming=True, packing=True, max_length=16)

    def make() -> StreamingBatches:
        return StreamingBatches(DataSource(path=f"hf:{folder}"), data, tokenizer, 2,
                                lambda r: collate(r, 0), rank=1, world_size=2)  # fmt: skip

    ref = make()
    it = iter(ref)
    first = [_doc_ids(next(it), tokenizer) for _ in range(2)]
    assert [d for b in first for d in b][:3] == [1, 3, 5]  # odd records on rank 1 of 2
    state = ref.state_dict()
    assert state["hf_state"] is not None
    expected = [_doc_ids(next(it), tokenizer) for _ in range(4)]  # crosses into epoch 2
    again = make()
    again.load_state_dict(state)
    it2 = iter(again)
    assert [_doc_ids(next(it2), tokenizer) for _ in range(4)] == expected
