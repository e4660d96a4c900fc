"""Sequence packing: several documents per row, positions restarting per document."""

from __future__ import annotations

from automodel.recipes.data._chat import IGNORE_INDEX

Example = dict[str, list[int]]


def pack(examples: list[Example], max_length: int) -> list[Example]:
    """Returns rows of at most ``max_length`` tokens, each holding whole documents back to back.

    Every row has ``input_ids``, ``labels`` and ``position_ids``; ``position_ids`` restart at 0
    at each document, which is how the attention mask (transformers' packed-sequence detection,
    or cu_seqlens for varlen kernels) keeps documents from attending to each other. Labels are
    pre-shifted per document, so no document predicts the first token of the next one.
    Documents longer than ``max_length`` must be truncated before packing.
    """
    rows: list[Example] = []
    row: Example = {"input_ids": [], "labels": [], "position_ids": []}
    for ex in examples:
        n = len(ex["input_ids"])
        assert n <= max_length, "truncate before packing"
        if len(row["input_ids"]) + n > max_length and row["input_ids"]:
            rows.append(row)
            row = {"input_ids": [], "labels": [], "position_ids": []}
        row["input_ids"] += ex["input_ids"]
        row["labels"] += ex["labels"]
        row["position_ids"] += list(range(n))
    if row["input_ids"]:
        rows.append(row)
    return rows


def cu_seqlens(position_ids: list[int]) -> list[int]:
    """Returns cumulative document boundaries ``[0, len(doc0), len(doc0)+len(doc1), ...]``."""
    starts = [i for i, p in enumerate(position_ids) if p == 0]
    return [*starts, len(position_ids)]


__all__ = ["IGNORE_INDEX", "cu_seqlens", "pack"]
