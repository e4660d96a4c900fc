"""Root test configuration: offline hub, the gpu marker, and the tiny-checkpoint fixtures."""

from __future__ import annotations

import os

# Set before anything imports huggingface_hub / datasets: tests never touch the network.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from harness.models import save_tiny_model
from harness.tokenizer import save_tokenizer


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run `pytest -m gpu` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: ``tiny_model_dir("llama", max_shard_size="40KB")`` -> a saved tiny HF checkpoint.

    Checkpoints are cached per session by their arguments; treat them as read-only.
    """
    cache: dict[tuple[object, ...], Path] = {}

    def make(name: str, **kwargs: object) -> Path:
        key = (name, *sorted(kwargs.items()))
        if key not in cache:
            base = tmp_path_factory.mktemp(f"tiny-{name}")
            cache[key] = save_tiny_model(name, base / name, **kwargs)  # type: ignore[arg-type]
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A locally trained tokenizer with a ChatML chat template (assistant spans marked)."""
    return save_tokenizer(tmp_path_factory.mktemp("tokenizer"))
