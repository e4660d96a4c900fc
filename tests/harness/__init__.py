"""Test harness shared by every test folder: tiny HF checkpoints, a local tokenizer, a multi-rank runner."""

from harness.distributed import free_port, run_distributed
from harness.models import (
    DECODER_MODELS,
    DENSE_DECODER_MODELS,
    MOE_MODELS,
    TINY_MODELS,
    build_tiny_model,
    save_tiny_model,
    tiny_config,
)
from harness.tokenizer import CHAT_TEMPLATE, save_tokenizer, train_tokenizer

__all__ = [
    "CHAT_TEMPLATE",
    "DECODER_MODELS",
    "DENSE_DECODER_MODELS",
    "MOE_MODELS",
    "TINY_MODELS",
    "build_tiny_model",
    "free_port",
    "run_distributed",
    "save_tiny_model",
    "save_tokenizer",
    "tiny_config",
    "train_tokenizer",
]
