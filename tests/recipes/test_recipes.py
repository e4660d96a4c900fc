"""Every recipe runs a few steps through the real CLI (a subprocess) on tiny models; outputs load."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from recipes._runs import DRIVER, QUICK, cli_env, losses, split_runs
from recipes._vlm_fixture import add_processor, write_vlm_data

from automodel.recipes._bundled import BUNDLED_DIR


def _drive(runs: list[list[str]], cwd: Path) -> list[tuple[int, str]]:
    proc = subprocess.run(
        [sys.executable, str(DRIVER), json.dumps(runs)], cwd=cwd, env=cli_env(),
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = split_runs(proc.stdout)
    assert len(out) == len(runs), proc.stdout + proc.stderr
    return out


@pytest.mark.slow
def test_pretrain_distill_lora_classification_vlm_benchmark(tmp_path: Path, tiny_model_dir):
    """One subprocess runs the real CLI six times: one interpreter and torch import for all."""
    qwen3 = tiny_model_dir("qwen3")
    qwen3_moe = tiny_model_dir("qwen3_moe")
    bert = tiny_model_dir("bert")
    llava = add_processor(Path(shutil.copytree(tiny_model_dir("llava"), tmp_path / "llava")))
    vlm_data = write_vlm_data(tmp_path / "vlm", 4)
    cls_data = tmp_path / "cls.jsonl"
    words = ["good", "bad", "fine"]
    cls_data.write_text(
        "".join(
            json.dumps({"text": f"this is {words[i % 3]} number {i}", "label": i % 3}) + "\n"
            for i in range(24)
        )
    )
    quick = [a for a in QUICK if not a.startswith("data.validation")]
    runs = [
        ["pretrain", *quick, "training.max_steps=3", "data.train.limit=null", f"training.output_dir={tmp_path / 'pre'}"],
        ["distill", *quick, "training.max_steps=2", f"training.output_dir={tmp_path / 'kd'}"],
        ["finetune", *quick, "training.max_steps=2", f"model.name_or_path={qwen3}", "peft.r=4",
         "training.sample_prompt=Hello!", "training.sample_max_new_tokens=4", f"training.output_dir={tmp_path / 'lora'}"],
        ["run", str(Path(__file__).parents[2] / "examples" / "classification_bert.yaml"), *quick,
         "training.max_steps=3", f"model.name_or_path={bert}", f"data.train.path={cls_data}",
         f"data.validation.path={cls_data}", "data.train.limit=null", "data.max_length=32",
         f"training.output_dir={tmp_path / 'cls'}"],
        ["benchmark", "training.max_steps=2", "benchmark.window=1", "benchmark.warmup_steps=1", "benchmark.seq_len=32"],
        ["run", str(Path(__file__).parents[2] / "examples" / "vlm_sft.yaml"),
         *[a for a in quick if not a.startswith("data.train.limit")], "training.max_steps=2",
         "training.micro_batch_size=2", "model.dtype=float32", f"model.name_or_path={llava}",
         f"data.train.path={vlm_data}", f"training.output_dir={tmp_path / 'vlm_out'}"],
        ["finetune", *quick, "training.max_steps=2", f"model.name_or_path={qwen3_moe}",
         "moe.aux_loss_coef=0.01", "moe.z_loss_coef=0.001", f"training.output_dir={tmp_path / 'moe'}"],
    ]  # fmt: skip
    results = _drive(runs, tmp_path)
    for code, body in results:
        assert code == 0, body

    # Pretraining: packed rows of whole documents, model folder loads.
    pre = losses(tmp_path / "pre")
    assert sorted(pre) == [1, 2, 3] and all(v == v and v > 0 for v in pre.values())
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    assert (
        AutoModelForCausalLM.from_pretrained(tmp_path / "pre" / "model").config.num_hidden_layers
        == 4
    )
    # Distillation: a 2-layer student trained against the 4-layer teacher.
    assert (
        AutoModelForCausalLM.from_pretrained(tmp_path / "kd" / "model").config.num_hidden_layers
        == 2
    )
    # LoRA: an adapter folder that Hugging Face peft loads onto the base model, and a sample.
    from peft import PeftModel

    adapter = tmp_path / "lora" / "adapter"
    assert (adapter / "adapter_config.json").is_file()
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(qwen3), adapter)
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())
    assert "sample: 'Hello!' ->" in results[2][1]
    assert results[2][1].strip().splitlines()[-1] == str(adapter.resolve())
    # Classification: validation accuracy reported, classifier loads with its 3 labels.
    assert re.search(r"val_accuracy=[0-9.]+", results[3][1])
    assert (
        AutoModelForSequenceClassification.from_pretrained(
            tmp_path / "cls" / "model"
        ).config.num_labels
        == 3
    )
    # Benchmark: per-window rows and the final table.
    bench = results[4][1]
    assert "| steps | tokens/s/rank | TFLOP/s/rank | MFU | peak GiB |" in bench
    assert re.search(r"steps 1-1: loss=[0-9.]+ tokens/s/rank=[0-9,]+ TFLOP/s/rank=", bench)
    assert str(BUNDLED_DIR / "tiny-llama") in bench
    # VLM SFT: image chats through the processor; the saved folder is a Llava with its processor.
    from transformers import AutoModelForImageTextToText, AutoProcessor

    final = Path(results[5][1].strip().splitlines()[-1])
    assert final == (tmp_path / "vlm_out" / "model").resolve()
    assert AutoModelForImageTextToText.from_pretrained(final).config.model_type == "llava"
    assert AutoProcessor.from_pretrained(final).chat_template
    # MoE SFT: router losses and load balance logged on every log step, on the console too.
    records = [json.loads(x) for x in (tmp_path / "moe" / "metrics.jsonl").read_text().splitlines()]
    moe_records = [r for r in records if "loss" in r]
    assert len(moe_records) == 2, records
    for rec in moe_records:
        assert rec["moe/aux_loss"] > 0 and rec["moe/z_loss"] > 0, rec
        assert rec["moe/imbalance_max"] >= rec["moe/imbalance_mean"] >= 1.0, rec
    assert re.search(r"step 2/2 loss=[0-9.]+ .* aux_loss=[0-9.e-]+ z_loss=", results[6][1])
