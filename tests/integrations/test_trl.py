"""TRL, unmodified, trains models built by automodel.core (SFT and DPO) like it trains transformers'."""

from __future__ import annotations

import pytest
import torch
import transformers

from automodel.core import AutoModelForCausalLM

trl = pytest.importorskip("trl", reason="trl is in the `integrations` dependency group")
datasets = pytest.importorskip(
    "datasets", reason="datasets is in the `integrations` dependency group"
)

pytestmark = pytest.mark.slow


def _chat_dataset():
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"what is {i} + {i}?"},
                {"role": "assistant", "content": f"{i} + {i} = {2 * i}"},
            ]
        }
        for i in range(16)
    ]
    return datasets.Dataset.from_list(rows)


def _train_args(out_dir, steps: int, *, bf16: bool = False) -> dict:
    """Returns the TrainingArguments every test shares: CPU, deterministic, no saving or reporting."""
    return dict(
        output_dir=str(out_dir),
        max_steps=steps,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        logging_steps=1,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=bf16,  # fp32 by default, so first-step losses must match transformers' class exactly
        seed=0,
        data_seed=0,
        dataloader_num_workers=0,
    )


def _sft_losses(model, tokenizer, out_dir, steps: int, *, bf16: bool = False) -> list[float]:
    config = trl.SFTConfig(**_train_args(out_dir, steps, bf16=bf16), assistant_only_loss=True)
    trainer = trl.SFTTrainer(
        model=model, args=config, train_dataset=_chat_dataset(), processing_class=tokenizer
    )
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_sft_trainer_trains_automodel_model(name, tiny_model_dir, tmp_path):
    path = tiny_model_dir(name)
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    ours = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert type(ours) is not type(theirs), "expected automodel's optimized class"
    assert isinstance(ours, transformers.PreTrainedModel)

    ours_losses = _sft_losses(ours, tokenizer, tmp_path / "ours", steps=6)
    theirs_losses = _sft_losses(theirs, tokenizer, tmp_path / "theirs", steps=1)
    assert ours_losses[0] == pytest.approx(theirs_losses[0], rel=1e-5)
    assert ours_losses[-1] < ours_losses[0]


def test_dpo_trainer_with_automodel_policy_and_reference(tiny_model_dir, tmp_path):
    path = tiny_model_dir("llama")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    rows = [
        {
            "prompt": [{"role": "user", "content": f"what is {i} + {i}?"}],
            "chosen": [{"role": "assistant", "content": f"{2 * i}"}],
            "rejected": [{"role": "assistant", "content": "no idea"}],
        }
        for i in range(16)
    ]
    config = trl.DPOConfig(**_train_args(tmp_path / "dpo", 4))
    trainer = trl.DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        ref_model=AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32),
        args=config,
        train_dataset=datasets.Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    # DPO starts at log(2) (policy == reference) and falls as chosen and rejected separate.
    assert losses[0] == pytest.approx(0.6931, abs=1e-3)
    assert losses[-1] < losses[0]


def test_sft_trainer_under_bf16_autocast(tiny_model_dir, tmp_path):
    """TRL's default mixed precision (bf16 autocast, fp32 residual stream) trains automodel's model."""
    path = tiny_model_dir("llama")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    losses = _sft_losses(model, tokenizer, tmp_path / "bf16", steps=3, bf16=True)
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
