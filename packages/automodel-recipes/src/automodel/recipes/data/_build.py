"""Builds tokenized examples for a recipe from the `data` config section."""

from __future__ import annotations

from typing import Any

from automodel.recipes.config import DataSection, DataSource
from automodel.recipes.data._chat import (
    IGNORE_INDEX,
    check_chat_template,
    instruction_to_messages,
    tokenize_chat,
)
from automodel.recipes.data._packing import pack
from automodel.recipes.data._readers import DataError, read_records


def build_examples(
    data: DataSection, source: DataSource, tokenizer: Any, *, log: Any = print
) -> list[dict[str, Any]]:
    """Returns tokenized (and, when configured, packed) examples for one split.

    Each example has ``input_ids`` and pre-shifted ``labels`` (plus ``position_ids`` when
    packed, ``label`` for classification). Over-long examples follow ``data.truncation``.

    Raises:
        DataError: unreadable data, bad records (per ``on_bad_line``), or nothing left.
    """
    records, bad_lines = read_records(source, data.on_bad_line)
    if data.format in ("chat", "instruction"):
        check_chat_template(tokenizer)
    examples: list[dict[str, Any]] = []
    skipped = {"malformed line": bad_lines, "bad record": 0, "too long": 0, "truncated": 0}
    for i, record in enumerate(records):
        try:
            ex = _tokenize(data, record, tokenizer)
        except DataError as e:
            if data.on_bad_line == "error":
                raise DataError(f"{source.path}: record {i + 1}: {e}") from None
            skipped["bad record"] += 1
            continue
        n = len(ex["input_ids"])
        if n > data.max_length:
            if data.truncation == "error":
                raise DataError(
                    f"{source.path}: record {i + 1} has {n} tokens > data.max_length="
                    f"{data.max_length}; raise max_length or set data.truncation=right|drop"
                )
            if data.truncation == "drop":
                skipped["too long"] += 1
                continue
            ex = {k: v[: data.max_length] if isinstance(v, list) else v for k, v in ex.items()}
            if ex.get("labels"):
                ex["labels"][-1] = IGNORE_INDEX  # its target was cut off
            skipped["truncated"] += 1
            if data.format in ("chat", "instruction") and all(
                t == IGNORE_INDEX for t in ex["labels"]
            ):
                skipped["too long"] += 1
                continue
        examples.append(ex)
    notes = ", ".join(f"{v} {k}" for k, v in skipped.items() if v)
    if not examples:
        raise DataError(
            f"{source.path}: no usable examples out of {len(records)} records"
            + (f" ({notes})" if notes else "")
            + "; check data.format, the columns, and data.max_length"
        )
    if notes:
        log(f"data {source.path}: {len(examples)} examples ({notes})")
    if data.packing:
        examples = pack(examples, data.max_length)
    return examples


def _tokenize(data: DataSection, record: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    if data.format == "chat":
        messages = record.get(data.messages_column)
        if not isinstance(messages, list):
            raise DataError(
                f"no {data.messages_column!r} list of messages (has: {', '.join(record)}); set "
                "data.messages_column"
            )
        ids, labels = tokenize_chat(tokenizer, messages)
        return {"input_ids": ids, "labels": labels}
    if data.format == "instruction":
        messages = instruction_to_messages(
            record, data.prompt_column, data.response_column, data.system_column
        )
        ids, labels = tokenize_chat(tokenizer, messages)
        return {"input_ids": ids, "labels": labels}
    if data.format == "text":
        text = record.get(data.text_column)
        if not isinstance(text, str):
            raise DataError(f"no {data.text_column!r} text column; set data.text_column")
        ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
        if tokenizer.eos_token_id is not None:
            ids.append(tokenizer.eos_token_id)
        return {"input_ids": ids, "labels": [*ids[1:], IGNORE_INDEX]}
    if data.format == "classification":
        text, label = record.get(data.text_column), record.get(data.label_column)
        if not isinstance(text, str) or not isinstance(label, int):
            raise DataError(
                f"classification records need text column {data.text_column!r} and integer "
                f"label column {data.label_column!r}"
            )
        ids = list(tokenizer(text)["input_ids"])
        return {"input_ids": ids, "labels": [IGNORE_INDEX] * len(ids), "label": label}
    raise DataError(f"data.format={data.format!r} is handled by the vlm_sft recipe, not here")
