"""from_pretrained(peft=...) in one process and with parallel=... on 2 gloo ranks (FSDP2, then TP).

Only the adapters train and their init is seeded; in parallel they are sharded with their base
layers and the loss equals the single-process model's before and after two optimizer steps.
save_pretrained writes a peft adapter (``peft.PeftModel.from_pretrained`` on plain transformers
gives the same logits) or, with merged=True, a full checkpoint plain transformers loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from harness.distributed import run_distributed

LORA = {"rank": 4, "alpha": 8}
SEED = 7
STEPS = 2


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 384, (2, 16), generator=gen)
    return ids, ids.clone()


def _train(model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor) -> list[float]:
    """Returns the loss before each of STEPS AdamW steps on the trainable parameters, and after."""
    from torch.distributed.tensor import DTensor

    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for step in range(STEPS + 1):
        loss = model(ids, labels=labels).loss
        value = loss.detach()
        losses.append(float(value.full_tensor() if isinstance(value, DTensor) else value))
        if step < STEPS:
            loss.backward()
            opt.step()
            opt.zero_grad()
    model.eval()
    return losses


def _worker(rank: int, world_size: int, path: str, out: str) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    from automodel.core import AutoModelForCausalLM

    ids, labels = _batch()
    results: dict[str, Any] = {}
    for name, parallel in [("fsdp", {"dp_shard": 2}), ("tp", {"dp_shard": 1, "tp": 2})]:
        # Ranks' RNGs differ: the adapters must still be rank 0's draw, as in one process.
        torch.manual_seed(SEED + rank)
        model = AutoModelForCausalLM.from_pretrained(path, parallel=parallel, peft=LORA)
        params = dict(model.named_parameters())
        trainable = {n for n, p in params.items() if p.requires_grad}
        assert trainable and all(".lora_" in n for n in trainable), (name, sorted(trainable)[:4])
        assert all(isinstance(params[n], DTensor) for n in trainable), name
        results[name] = _train(model, ids, labels)  # the same batch on both ranks
        with torch.no_grad():
            logits = model(ids).logits
        results[f"{name}/logits"] = logits.full_tensor() if isinstance(logits, DTensor) else logits
        if name == "fsdp":
            model.save_pretrained(Path(out) / "fsdp-merged", merged=True)
        else:
            model.save_pretrained(Path(out) / "tp-adapter")
    return results


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama"])
def test_parallel_lora_matches_single_process(family: str, tiny_model_dir, tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    import transformers

    from automodel.core import AutoModelForCausalLM, LoraConfig

    path = tiny_model_dir(family)
    ids, labels = _batch()
    with torch.no_grad():
        base_loss = float(AutoModelForCausalLM.from_pretrained(path)(ids, labels=labels).loss)
    torch.manual_seed(SEED)
    reference = AutoModelForCausalLM.from_pretrained(path, peft=LoraConfig(**LORA))
    trainable = [n for n, p in reference.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    initial = _adapters(reference)
    assert all(not v.any() for n, v in initial.items() if "lora_B" in n)  # B zeros, A random
    assert all(v.abs().sum() > 0 for n, v in initial.items() if "lora_A" in n)
    expected = _train(reference, ids, labels)
    assert expected[0] == pytest.approx(base_loss, rel=1e-6)  # lora_B starts at zero
    assert expected[-1] < expected[0] - 1e-3  # the adapters trained
    with torch.no_grad():
        want = reference(ids).logits
    _check_single_process_saves(reference, path, tmp_path, ids, want, peft)

    # Rank 1's RNG differs from rank 0's: equal losses after the steps also show that the adapters
    # come from one seed (rank 0's draw, as here), whatever the ranks' RNG states.
    results = run_distributed(_worker, 2, path=str(path), out=str(tmp_path))
    for rank_result in results:
        for name in ("fsdp", "tp"):
            torch.testing.assert_close(rank_result[name], expected, rtol=1e-5, atol=1e-5, msg=name)
    got = results[0]

    # Saved files are compared with the model that wrote them: after AdamW steps, adapter entries
    # whose gradient is near Adam's eps may move differently under TP's other summation order.
    with torch.no_grad():
        # the TP-sharded adapter, gathered, loads in peft onto plain transformers
        base = transformers.AutoModelForCausalLM.from_pretrained(path)
        adapted = peft.PeftModel.from_pretrained(base, tmp_path / "tp-adapter")
        torch.testing.assert_close(adapted(ids).logits, got["tp/logits"], atol=1e-5, rtol=0)
        # the FSDP2 model merged and consolidated loads as a plain transformers checkpoint
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp-merged")
        assert type(merged).__module__.startswith("transformers.")
        torch.testing.assert_close(merged(ids).logits, got["fsdp/logits"], atol=1e-5, rtol=0)
        torch.testing.assert_close(got["fsdp/logits"], want, atol=1e-5, rtol=0)


def _adapters(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if ".lora_" in n}


def _check_single_process_saves(
    model: Any, path: Path, tmp_path: Path, ids: torch.Tensor, want: torch.Tensor, peft: Any
) -> None:
    import transformers
    from safetensors import safe_open

    from automodel.core.peft import adapter_modules

    model.save_pretrained(tmp_path / "adapter")
    written = {p.name for p in (tmp_path / "adapter").iterdir()}
    assert written == {"adapter_model.safetensors", "adapter_config.json"}
    with torch.no_grad():
        adapted = peft.PeftModel.from_pretrained(
            transformers.AutoModelForCausalLM.from_pretrained(path), tmp_path / "adapter"
        )
        torch.testing.assert_close(adapted(ids).logits, want, atol=1e-5, rtol=0)

        model.save_pretrained(tmp_path / "merged", merged=True)
        assert not any(m.merged for m in adapter_modules(model).values())  # still trainable
        with safe_open(tmp_path / "merged" / "model.safetensors", "pt") as f:
            assert f.keys() and not [k for k in f.keys() if "lora" in k]  # noqa: SIM118
        merged = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
        torch.testing.assert_close(merged(ids).logits, want, atol=1e-5, rtol=0)
        torch.testing.assert_close(model(ids).logits, want, atol=1e-5, rtol=0)
