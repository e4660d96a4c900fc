"""VLM SFT data: processor-rendered image chats with assistant-only labels (the CLI run is in test_recipes)."""

from __future__ import annotations

from pathlib import Path

from recipes._vlm_fixture import add_processor, write_vlm_data

from automodel.recipes.config import DataSection, DataSource
from automodel.recipes.data import IGNORE_INDEX


def test_vlm_labels_images_and_batches(tmp_path: Path, tiny_model_dir):
    import shutil

    from transformers import AutoProcessor

    from automodel.recipes.data._vlm import build_vlm_examples, collate_vlm

    model_dir = add_processor(Path(shutil.copytree(tiny_model_dir("llava"), tmp_path / "llava")))
    data = write_vlm_data(tmp_path / "data", 4)
    processor = AutoProcessor.from_pretrained(model_dir)
    examples = build_vlm_examples(
        DataSection(format="vlm_chat"), DataSource(path=str(data)), processor
    )
    assert len(examples) == 4
    ex = examples[0]
    assert ex["input_ids"].count(5) == 16  # <image> expanded to (32 / 8) ** 2 patch tokens
    supervised = [t for t in ex["labels"] if t != IGNORE_INDEX]
    assert processor.tokenizer.decode(supervised) == "It is red.<|im_end|>"
    batch = collate_vlm(examples[:2], processor.tokenizer.pad_token_id)
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
