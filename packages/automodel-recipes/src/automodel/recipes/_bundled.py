"""Where the bundled default (tiny model, tokenizer, chat data, default configs) lives."""

from __future__ import annotations

from pathlib import Path

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
"""Folder shipped inside the wheel; referenced in configs as ``${AUTOMODEL_BUNDLED}``."""


def default_config(recipe: str) -> Path:
    """Returns the path of the bundled default config for ``recipe`` (e.g. ``finetune``)."""
    path = BUNDLED_DIR / "configs" / f"{recipe}.yaml"
    if not path.is_file():
        available = sorted(p.stem for p in (BUNDLED_DIR / "configs").glob("*.yaml"))
        raise ValueError(f"no bundled default for {recipe!r}; available: {', '.join(available)}")
    return path
