"""Image + text chats -> token ids, pixel values and assistant-only labels, through the model's processor."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from automodel.recipes.config import DataSection, DataSource
from automodel.recipes.data._chat import IGNORE_INDEX, check_chat_template
from automodel.recipes.data._readers import DataError, read_records


def _with_image_paths(
    messages: list[dict[str, Any]], images: list[str], base: Path
) -> list[dict[str, Any]]:
    """Returns messages whose ``{"type": "image"}`` items carry the record's image paths, in order."""
    queue = [str(p if Path(p).is_absolute() else base / p) for p in images]
    out = []
    for m in messages:
        content = m.get("content")
        if isinstance(content, str):
            content = [{"type": "text", "text": content}]
        items = []
        for item in content or []:
            if item.get("type") == "image" and not any(k in item for k in ("path", "url", "image")):
                if not queue:
                    raise DataError("more {'type': 'image'} items than paths in the images column")
                item = {**item, "path": queue.pop(0)}
            items.append(item)
        out.append({**m, "content": items})
    if queue:
        raise DataError(
            f"{len(queue)} image path(s) not referenced by any {{'type': 'image'}} item"
        )
    return out


def build_vlm_examples(
    data: DataSection, source: DataSource, processor: Any, *, log: Any = print
) -> list[dict[str, Any]]:
    """Returns examples with ``input_ids``, pre-shifted ``labels`` and ``pixel_values`` per chat.

    Labels cover assistant tokens only (the processor's chat template marks them with
    ``{% generation %}``); image tokens are never labels. Over-long examples are dropped
    (``truncation: right|drop``) or an error (``error``): cutting through image tokens would
    break their alignment with the pixel values.

    Raises:
        DataError: missing template or columns, bad records (per ``on_bad_line``), nothing left.
    """
    check_chat_template(processor)
    records, bad = read_records(source, data.on_bad_line)
    base = Path(source.path).parent
    examples, skipped, too_long = [], bad, 0
    for i, record in enumerate(records):
        try:
            messages = record.get(data.messages_column)
            if not isinstance(messages, list) or not any(
                m.get("role") == "assistant" for m in messages
            ):
                raise DataError(f"no {data.messages_column!r} chat with an assistant turn")
            messages = _with_image_paths(messages, list(record.get(data.images_column) or []), base)
            out = processor.apply_chat_template(
                messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
                return_tensors="pt",
            )  # fmt: skip
        except (DataError, OSError) as e:
            if data.on_bad_line == "error":
                raise DataError(f"{source.path}: record {i + 1}: {e}") from None
            skipped += 1
            continue
        ids = out["input_ids"][0].tolist()
        mask = torch.as_tensor(out["assistant_masks"]).reshape(-1).tolist()
        if len(ids) > data.max_length:
            if data.truncation == "error":
                raise DataError(
                    f"{source.path}: record {i + 1} has {len(ids)} tokens > data.max_length="
                    f"{data.max_length}; raise max_length or set data.truncation=drop"
                )
            too_long += 1
            continue
        labels = [ids[j + 1] if mask[j + 1] else IGNORE_INDEX for j in range(len(ids) - 1)]
        ex: dict[str, Any] = {"input_ids": ids, "labels": [*labels, IGNORE_INDEX]}
        for key in ("pixel_values", "image_sizes", "image_grid_thw"):
            if key in out:
                ex[key] = out[key]
        examples.append(ex)
    if not examples:
        raise DataError(f"{source.path}: no usable examples out of {len(records)} records")
    if skipped or too_long:
        log(f"data {source.path}: {len(examples)} examples ({skipped} bad, {too_long} too long)")
    return examples


def collate_vlm(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Returns a right-padded batch with the examples' vision tensors concatenated."""
    from automodel.recipes.data._collate import collate

    text = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    batch = collate(text, pad_token_id)
    for key in ("pixel_values", "image_sizes", "image_grid_thw"):
        if key in examples[0]:
            batch[key] = torch.cat([e[key] for e in examples])
    return batch
