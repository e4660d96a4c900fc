"""The README's main command, end to end: `automodel finetune` on the bundled default (shortened)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from recipes._runs import automodel_in_process


def _automodel(
    *args: str, cwd: Path, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "automodel.recipes.cli", *args],
        cwd=cwd,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": "", **(env or {})},
        capture_output=True,
        text=True,
        timeout=400,
    )


@pytest.mark.slow
def test_finetune_bundled_default_end_to_end(tmp_path: Path) -> None:
    out_dir = tmp_path / "run"
    # The bundled default, shortened: fewer steps and chats, same model, data and code path.
    args = [
        "finetune",
        "training.max_steps=60",
        "training.log_every=10",
        "training.val_every=30",
        "training.micro_batch_size=8",
        "lr_scheduler.warmup_steps=5",
        "data.train.limit=480",
        "checkpoint.every_steps=30",
    ]
    proc = _automodel(*args, cwd=tmp_path, env={"AUTOMODEL_OUTPUT_DIR": str(out_dir)})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert any(line.endswith("float32 on cpu x1") for line in lines if line.startswith("model "))

    losses = [float(m) for m in re.findall(r"step \d+/60 loss=([0-9.]+)", proc.stdout)]
    assert len(losses) == 6, proc.stdout
    assert losses[-1] < 0.7 * losses[0], f"loss did not fall visibly: {losses}"
    assert "val_loss=" in proc.stdout

    # Last line: the saved HF folder, which plain transformers loads and generates from.
    final = Path(lines[-1])
    assert final == (out_dir / "model").resolve() and (final / "config.json").is_file()
    sample = next(line for line in lines if line.startswith("sample: "))
    assert "->" in sample and len(sample.split("->", 1)[1].strip(" '\"")) > 0

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 plus 3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    with torch.no_grad():
        logits = model(ids).logits
    assert torch.isfinite(logits).all()
    assert (out_dir / "metrics.jsonl").is_file() and (out_dir / "FINISHED").is_file()
    assert (out_dir / "checkpoints" / "step_60" / "model.safetensors").is_file()

    # Running again into the finished run refuses in one line and leaves everything in place
    # (the same CLI, in this process: no second interpreter and torch import needed for it).
    before = {p: p.stat().st_mtime_ns for p in out_dir.rglob("*") if p.is_file()}
    again = automodel_in_process(*args, f"training.output_dir={out_dir}")
    assert again.exit_code == 1
    err = again.stderr.strip().splitlines()
    assert len(err) == 1 and "already holds a finished run" in err[0], again.stderr
    assert "if_output_exists=resume" in err[0]
    after = {p: p.stat().st_mtime_ns for p in out_dir.rglob("*") if p.is_file()}
    assert after == before
