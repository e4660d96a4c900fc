"""VLM SFT: processor-rendered image chats with assistant-only labels, trained through the CLI."""

from __future__ import annotations

from pathlib import Path

import pytest
from recipes._runs import QUICK, automodel
from recipes._vlm_fixture import add_processor, write_vlm_data

from automodel.recipes.config import DataSection, DataSource
from automodel.recipes.data import IGNORE_INDEX


@pytest.mark.slow
def test_vlm_labels_and_a_short_cli_run(tmp_path: Path, tiny_model_dir):
    import shutil

    from transformers import AutoModelForImageTextToText, AutoProcessor

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

    args = [a for a in QUICK if not a.startswith(("data.validation", "data.train.limit"))]
    root = Path(__file__).parents[2]
    proc = automodel(
        "run", str(root / "examples" / "vlm_sft.yaml"), *args, "training.max_steps=2",
        "training.micro_batch_size=2", "model.dtype=float32", f"model.name_or_path={model_dir}",
        f"data.train.path={data}", f"training.output_dir={tmp_path / 'out'}", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    final = Path(proc.stdout.strip().splitlines()[-1])
    assert final == (tmp_path / "out" / "model").resolve()
    assert AutoModelForImageTextToText.from_pretrained(final).config.model_type == "llava"
    assert AutoProcessor.from_pretrained(final).chat_template
