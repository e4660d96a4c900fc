"""Data pipeline: assistant-only masks, packing isolation, bad input, sharded resumable loading."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from automodel.recipes._components import lm_inputs
from automodel.recipes.config import DataSection, DataSource
from automodel.recipes.data import (
    IGNORE_INDEX,
    DataError,
    ShardedBatches,
    build_examples,
    collate,
    cu_seqlens,
    pack,
    tokenize_chat,
)

CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hello!"},
    {"role": "assistant", "content": "Hi there."},
    {"role": "user", "content": "What is 1 + 1?"},
    {"role": "assistant", "content": "2"},
]


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tokenizer_dir)


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_assistant_only_labels_on_a_multi_turn_chat(tokenizer):
    ids, labels = tokenize_chat(tokenizer, CHAT)
    assert len(ids) == len(labels)
    # Labels are next-token targets: the supervised tokens are exactly the assistant replies
    # (content + <|im_end|>), in order, and nothing of the system/user turns or role headers.
    supervised = [t for t in labels if t != IGNORE_INDEX]
    expected = tokenizer("Hi there.<|im_end|>")["input_ids"] + tokenizer("2<|im_end|>")["input_ids"]
    assert supervised == expected
    text_before_first = tokenizer.decode(ids[: labels.index(supervised[0]) + 1])
    assert text_before_first.endswith("<|im_start|>assistant\n")
    assert labels[-1] == IGNORE_INDEX


def test_chat_errors_no_assistant_and_no_template(tokenizer, tmp_path: Path):
    with pytest.raises(DataError, match="no assistant turn"):
        tokenize_chat(tokenizer, CHAT[:2])
    path = _write_jsonl(tmp_path / "c.jsonl", [{"messages": CHAT}, {"messages": CHAT[:2]}])
    with pytest.raises(DataError, match=r"c.jsonl: record 2: chat has no assistant turn"):
        build_examples(DataSection(), DataSource(path=str(path)), tokenizer)
    ok = build_examples(
        DataSection(on_bad_line="skip"), DataSource(path=str(path)), tokenizer, log=lambda s: None
    )
    assert len(ok) == 1

    from transformers import AutoTokenizer

    plain = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    plain.chat_template = None
    with pytest.raises(DataError, match=r"has no chat template; set tokenizer\.chat_template"):
        build_examples(DataSection(), DataSource(path=str(path)), plain)
    plain.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    with pytest.raises(DataError, match=re.escape("no {% generation %} markers")):
        build_examples(DataSection(), DataSource(path=str(path)), plain)


def test_malformed_jsonl_reports_file_line_or_skips_and_counts(tokenizer, tmp_path: Path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"messages": CHAT}, "{not json", {"messages": CHAT}])
    with pytest.raises(DataError, match=r"d.jsonl:2: malformed JSONL line .*data.on_bad_line=skip"):
        build_examples(DataSection(), DataSource(path=str(path)), tokenizer)
    notes: list[str] = []
    ex = build_examples(
        DataSection(on_bad_line="skip"), DataSource(path=str(path)), tokenizer, log=notes.append
    )
    assert len(ex) == 2 and "1 malformed line" in notes[0]
    with pytest.raises(DataError, match="does not exist"):
        build_examples(DataSection(), DataSource(path=str(tmp_path / "missing.jsonl")), tokenizer)
    empty = _write_jsonl(tmp_path / "e.jsonl", ["{broken"])
    with pytest.raises(DataError, match="no usable examples out of 0 records"):
        build_examples(DataSection(on_bad_line="skip"), DataSource(path=str(empty)), tokenizer)


def test_truncation_policies_and_instruction_columns(tokenizer, tmp_path: Path):
    long = {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "word " * 120},
        ]
    }
    path = _write_jsonl(tmp_path / "l.jsonl", [{"messages": CHAT}, long])
    src = DataSource(path=str(path))
    with pytest.raises(DataError, match=r"record 2 has \d+ tokens > data.max_length=80"):
        build_examples(DataSection(max_length=80, truncation="error"), src, tokenizer)
    assert (
        len(
            build_examples(
                DataSection(max_length=80, truncation="drop"), src, tokenizer, log=lambda s: None
            )
        )
        == 1
    )
    cut = build_examples(DataSection(max_length=80), src, tokenizer, log=lambda s: None)
    assert len(cut) == 2 and len(cut[1]["input_ids"]) == 80 and cut[1]["labels"][-1] == IGNORE_INDEX

    inst = _write_jsonl(tmp_path / "i.jsonl", [{"q": "Hello!", "a": "Hi there."}])
    data = DataSection(format="instruction", prompt_column="q", response_column="a")
    (ex,) = build_examples(data, DataSource(path=str(inst)), tokenizer)
    ids, labels = tokenize_chat(tokenizer, CHAT[1:3])
    assert ex == {"input_ids": ids, "labels": labels}
    with pytest.raises(DataError, match="no column 'prompt'"):
        build_examples(DataSection(format="instruction"), DataSource(path=str(inst)), tokenizer)


def test_packing_keeps_documents_from_attending_to_each_other(tiny_model_dir, tokenizer):
    """Logits of each document inside a packed row equal those of the document run alone."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir("llama"), attn_implementation="sdpa"
    ).eval()
    docs = [
        tokenize_chat(tokenizer, CHAT),
        tokenize_chat(tokenizer, CHAT[1:3]),
        tokenize_chat(tokenizer, CHAT[3:]),
    ]
    examples = [{"input_ids": i, "labels": lab} for i, lab in docs]
    rows = pack(examples, max_length=128)
    assert len(rows) == 1
    row = rows[0]
    bounds = cu_seqlens(row["position_ids"])
    assert bounds == [0, len(docs[0][0]), len(docs[0][0]) + len(docs[1][0]), len(row["input_ids"])]
    assert row["labels"] == docs[0][1] + docs[1][1] + docs[2][1]  # no label crosses a boundary

    batch = collate([row], pad_token_id=0)
    assert "attention_mask" not in batch  # document masking comes from the restarting positions
    with torch.no_grad():
        # The recipes' own forward inputs (use_cache=False is what enables document masking).
        packed = model(**lm_inputs(batch)).logits[0]
        for (ids, _), start, end in zip(docs, bounds[:-1], bounds[1:]):
            alone = model(input_ids=torch.tensor([ids])).logits[0]
            torch.testing.assert_close(packed[start:end], alone, rtol=1e-5, atol=1e-5)
        # Control: the same row without document positions does mix documents.
        mixed = model(input_ids=batch["input_ids"], use_cache=False).logits[0]
        assert not torch.allclose(
            mixed[bounds[1] : bounds[2]], packed[bounds[1] : bounds[2]], atol=1e-3
        )


def test_sharded_batches_are_disjoint_across_ranks_and_resume_exactly():
    examples = [{"input_ids": [i], "labels": [i]} for i in range(20)]

    def ids(batch):
        return batch["input_ids"].flatten().tolist()

    def make(rank):
        return ShardedBatches(examples, 3, lambda r: collate(r, 0), rank=rank, world_size=2, seed=5)

    r0, r1 = make(0), make(1)
    assert r0.batches_per_epoch == 3
    it0, it1 = iter(r0), iter(r1)
    epoch0 = [ids(next(it0)) for _ in range(3)] + [ids(next(it1)) for _ in range(3)]
    flat = [i for b in epoch0 for i in b]
    assert len(flat) == len(set(flat)) == 18  # no example on two ranks; the last 2 are dropped

    first = [ids(next(it0)) for _ in range(2)]  # into epoch 1
    state = r0.state_dict()
    rest = [ids(next(it0)) for _ in range(4)]
    again = make(0)
    again.load_state_dict(state)
    it = iter(again)
    assert [ids(next(it)) for _ in range(4)] == rest
    assert first != epoch0[:2]  # a fresh permutation each epoch
    with pytest.raises(ValueError, match="cannot fill one batch of 16 on each of 2 rank"):
        ShardedBatches(examples, 16, lambda r: r, world_size=2)
