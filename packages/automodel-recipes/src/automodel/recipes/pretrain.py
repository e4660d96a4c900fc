"""Pretraining (from scratch or continued) of a causal LM on plain text, packed.

    automodel pretrain                                   # bundled tiny default
    automodel run examples/pretrain_llama_from_scratch.yaml --nproc-per-node 8

``model.from_scratch: true`` builds the architecture from ``config.json`` with random weights;
otherwise training continues from the checkpoint's weights. With ``data.packing: true`` documents
are concatenated into ``max_length`` rows whose position ids restart per document, so documents
never attend to each other and no compute is spent on padding.
"""

from __future__ import annotations

from pathlib import Path

from automodel.recipes._lm_training import run_causal_lm
from automodel.recipes.config import ConfigError, RecipeConfig


def run(cfg: RecipeConfig) -> Path:
    """Runs pretraining per ``cfg``; returns the saved model folder."""
    if cfg.data.format != "text" and cfg.data.dataset is None:
        raise ConfigError(f"data.format={cfg.data.format!r}: pretraining reads 'text' data")
    return run_causal_lm(cfg)
