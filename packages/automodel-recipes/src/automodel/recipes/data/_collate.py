"""Batches examples into padded tensors (attention mask) or packed rows (position ids)."""

from __future__ import annotations

from typing import Any

import torch

from automodel.recipes.data._chat import IGNORE_INDEX


def collate(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Returns a right-padded batch: input_ids, labels (-100 on padding), and the attention inputs.

    Packed rows (with ``position_ids``) get position ids and no attention mask: padding becomes one
    more "document" starting at position 0, which transformers turns into a block-diagonal mask.
    Unpacked rows get an ``attention_mask`` (1 = real token).
    """
    width = max(len(ex["input_ids"]) for ex in examples)
    batch: dict[str, list[list[int]]] = {"input_ids": [], "labels": []}
    packed = "position_ids" in examples[0]
    if packed:
        batch["position_ids"] = []
    else:
        batch["attention_mask"] = []
    for ex in examples:
        n = len(ex["input_ids"])
        pad = width - n
        batch["input_ids"].append(ex["input_ids"] + [pad_token_id] * pad)
        batch["labels"].append(ex["labels"] + [IGNORE_INDEX] * pad)
        if packed:
            batch["position_ids"].append(ex["position_ids"] + list(range(pad)))
        else:
            batch["attention_mask"].append([1] * n + [0] * pad)
    out = {k: torch.tensor(v, dtype=torch.long) for k, v in batch.items()}
    for extra in ("label",):
        if extra in examples[0]:
            out["label"] = torch.tensor([ex["label"] for ex in examples], dtype=torch.long)
    return out
