"""lm-evaluation-harness, unmodified, evaluates automodel.core models with the scores transformers' give.

Use: ``HFLM(pretrained=<automodel model object>, tokenizer=tokenizer)`` then ``simple_evaluate``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from automodel.core import AutoModelForCausalLM

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is in the `integrations` dependency group")

pytestmark = pytest.mark.slow

DATA = Path(__file__).parent / "data"


def _evaluate(model, tokenizer, task_dir: Path) -> dict[str, float]:
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=4, device="cpu")
    results = simple_evaluate(
        model=lm,
        tasks=["tiny_arith"],
        task_manager=TaskManager(include_path=str(task_dir)),
        random_seed=0,
    )
    scores = results["results"]["tiny_arith"]
    return {"acc": scores["acc,none"], "acc_norm": scores["acc_norm,none"]}


def test_scores_match_transformers(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets-cache"))
    task_dir = tmp_path / "tasks"
    task_dir.mkdir()
    yaml = (
        (DATA / "tiny_arith.yaml")
        .read_text()
        .replace("TINY_ARITH_JSONL", str(DATA / "tiny_arith.jsonl"))
    )
    (task_dir / "tiny_arith.yaml").write_text(yaml)

    path = tiny_model_dir("llama")
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    ours = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    theirs = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    assert type(ours) is not type(theirs), "expected automodel's optimized class"

    ours_scores = _evaluate(ours, tokenizer, task_dir)
    theirs_scores = _evaluate(theirs, tokenizer, task_dir)
    assert ours_scores == theirs_scores
    assert 0.0 <= ours_scores["acc"] <= 1.0
