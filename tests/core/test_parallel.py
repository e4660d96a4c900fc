"""from_pretrained(parallel=...) on 2 gloo ranks (FSDP2, then TP): the loss equals the
single-process model's, backward runs, and save_pretrained writes a checkpoint transformers loads."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from harness.distributed import run_distributed


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 384, (2, 16), generator=gen)
    return ids, ids.clone()


def _worker(rank: int, world_size: int, path: str, out: str) -> dict[str, float]:
    from torch.distributed.tensor import DTensor

    from automodel.core import AutoModelForCausalLM

    ids, labels = _batch()
    results: dict[str, float] = {}
    for name, parallel in [("fsdp", {"dp_shard": 2}), ("tp", {"dp_shard": 1, "tp": 2})]:
        model = AutoModelForCausalLM.from_pretrained(path, parallel=parallel)
        assert any(isinstance(p, DTensor) for p in model.parameters()), name
        out_ = model(ids, labels=labels)
        out_.loss.backward()
        results[name] = float(
            out_.loss.detach().full_tensor()
            if isinstance(out_.loss, DTensor)
            else out_.loss.detach()
        )
        if name == "tp":
            model.save_pretrained(out)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama"])
def test_parallel_loss_matches_single_process(family: str, tiny_model_dir, tmp_path: Path) -> None:
    import transformers

    from automodel.core import AutoModelForCausalLM

    path = tiny_model_dir(family)
    ids, labels = _batch()
    with torch.no_grad():
        expected = float(AutoModelForCausalLM.from_pretrained(path)(ids, labels=labels).loss)
    results = run_distributed(_worker, 2, path=str(path), out=str(tmp_path / "saved"))
    for rank_result in results:
        for name, loss in rank_result.items():
            assert loss == pytest.approx(expected, rel=1e-5), (name, loss, expected)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path)
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref(ids).logits, atol=0, rtol=0)
