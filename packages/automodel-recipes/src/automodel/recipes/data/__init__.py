"""Data pipeline: readers, chat/instruction/text tokenization, packing, batching, sharded loading."""

from automodel.recipes.data._build import build_examples
from automodel.recipes.data._chat import (
    IGNORE_INDEX,
    check_chat_template,
    instruction_to_messages,
    tokenize_chat,
)
from automodel.recipes.data._collate import collate
from automodel.recipes.data._loader import ShardedBatches
from automodel.recipes.data._packing import cu_seqlens, pack
from automodel.recipes.data._readers import DataError, read_records
from automodel.recipes.data._streaming import StreamingBatches

__all__ = [
    "IGNORE_INDEX",
    "DataError",
    "ShardedBatches",
    "StreamingBatches",
    "build_examples",
    "check_chat_template",
    "collate",
    "cu_seqlens",
    "instruction_to_messages",
    "pack",
    "read_records",
    "tokenize_chat",
]
