"""LoRA / DoRA under FSDP2 and tensor parallelism (2 gloo ranks) equals the single-process model.

Adapters are applied first, then the model is parallelized with ``automodel.parallel.parallelize``
(FSDP2 over dp_shard=2, or TP=2 with the structural plan). One launch of two ranks checks:
training losses over three AdamW steps, the adapters' DTensor placements under TP, saving a
sharded adapter (gathered to the single-process tensors) and loading an adapter into sharded models.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from automodel.core.peft import (
    LoraConfig,
    apply_peft,
    load_adapter,
    merge_adapters,
    reset_adapters,
    save_adapter,
    unmerge_adapters,
)
from harness.distributed import run_distributed
from harness.models import VOCAB_SIZE, build_tiny_model

STEPS = 3


def _make(config: LoraConfig) -> torch.nn.Module:
    model = build_tiny_model("llama", seed=0)
    torch.manual_seed(1)  # the same adapter init on every rank and in the reference
    return apply_peft(model, config)


def _train(
    model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], dp_mean: bool
) -> list[float]:
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        reported = loss.detach().clone()
        if dp_mean:  # ranks hold equal token counts: the mean of rank means is the global mean
            dist.all_reduce(reported)
            reported /= dist.get_world_size()
        losses.append(reported.item())
    return losses


def _adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    from torch.distributed.tensor import DTensor

    return {
        n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
        for n, p in model.named_parameters()
        if ".lora_" in n
    }


def _eval_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    model.eval()
    with torch.no_grad():
        return float(model(**batch).loss)


def _lora_parallel_worker(rank: int, world_size: int, out_dir: str) -> dict[str, Any]:
    from torch.distributed.tensor import DTensor

    from automodel.parallel import ParallelConfig, build_mesh, parallelize

    out = Path(out_dir)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(STEPS):
        ids = torch.randint(5, VOCAB_SIZE, (4, 16), generator=g)
        batches.append({"input_ids": ids, "labels": ids})
    eval_batch = batches[0]
    local = [{k: v[2 * rank : 2 * rank + 2] for k, v in b.items()} for b in batches]
    result: dict[str, Any] = {}
    fsdp_cfg, tp_cfg = ParallelConfig(dp_shard=2), ParallelConfig(dp_shard=1, tp=2)
    fsdp_mesh, tp_mesh = build_mesh(fsdp_cfg, "cpu"), build_mesh(tp_cfg, "cpu")

    for kind, lora in {
        "lora": LoraConfig(rank=4, alpha=8, target_modules="all-linear"),
        "dora": LoraConfig(rank=4, alpha=8, target_modules="all-linear", use_dora=True),
    }.items():
        reference = _make(lora)
        result[f"{kind}/reference"] = _train(reference, batches, dp_mean=False)
        reference_state = _adapter_state(reference)
        result[f"{kind}/reference_eval"] = _eval_loss(reference, eval_batch)

        fsdp = parallelize(_make(lora), fsdp_cfg, fsdp_mesh)
        result[f"{kind}/fsdp"] = _train(fsdp, local, dp_mean=True)
        result[f"{kind}/fsdp_param_diff"] = max(
            (v - reference_state[n]).abs().max().item() for n, v in _adapter_state(fsdp).items()
        )
        save_adapter(fsdp, out / f"{kind}-fsdp")

        tp = parallelize(_make(lora), tp_cfg, tp_mesh)
        attn, mlp = tp.model.layers[0].self_attn, tp.model.layers[0].mlp
        result[f"{kind}/placements"] = {
            f"{mod}.{p}": tuple(getattr(getattr(owner, mod), p).placements)
            for owner, mods in ((attn, ("q_proj", "o_proj")), (mlp, ("up_proj", "down_proj")))
            for mod in mods
            for p in ("lora_A", "lora_B", "lora_magnitude_vector")
            if hasattr(getattr(owner, mod), p)
        }
        assert all(isinstance(p, DTensor) for n, p in tp.named_parameters() if ".lora_" in n)
        result[f"{kind}/tp"] = _train(tp, batches, dp_mean=False)
        result[f"{kind}/tp_param_diff"] = max(
            (v - reference_state[n]).abs().max().item() for n, v in _adapter_state(tp).items()
        )
        save_adapter(tp, out / f"{kind}-tp")
        # Merging folds each rank's adapter slice into its weight slice, and unmerging undoes it.
        for name, model, batch in (("fsdp", fsdp, local[0]), ("tp", tp, eval_batch)):
            losses = []
            for step in (None, merge_adapters, unmerge_adapters):
                if step is not None:
                    step(model)
                loss = torch.tensor(_eval_loss(model, batch))
                if name == "fsdp":
                    dist.all_reduce(loss)
                    loss /= world_size
                losses.append(loss.item())
            result[f"{kind}/{name}_merge_evals"] = losses

        # A saved adapter loads into freshly sharded models, each rank taking its own slices.
        save_adapter(reference, out / f"{kind}-reference")
        for name, cfg, mesh in (("fsdp", fsdp_cfg, fsdp_mesh), ("tp", tp_cfg, tp_mesh)):
            fresh = parallelize(_make(lora), cfg, mesh)
            # Re-initialized in place (the meta-device path): each rank's slice of the same values.
            reset_adapters(fresh, seed=5)
            expected = _adapter_state(reset_adapters(_make(lora), seed=5))
            result[f"{kind}/{name}_reset_diff"] = max(
                (v - expected[n]).abs().max().item() for n, v in _adapter_state(fresh).items()
            )
            load_adapter(fresh, out / f"{kind}-reference")
            batch = eval_batch if name == "tp" else local[0]
            loss = torch.tensor(_eval_loss(fresh, batch))
            if name == "fsdp":
                dist.all_reduce(loss)
                loss /= world_size
            result[f"{kind}/{name}_loaded_eval"] = loss.item()
            # After an evaluation forward FSDP may hold gathered copies: writes must reach shards.
            reset_adapters(fresh, seed=5)
            again = torch.tensor(_eval_loss(fresh, batch))
            if name == "fsdp":
                dist.all_reduce(again)
                again /= world_size
            result[f"{kind}/{name}_reset_eval"] = again.item()
        result[f"{kind}/reset_eval"] = _eval_loss(reset_adapters(_make(lora), seed=5), eval_batch)
        if rank == 0:
            from safetensors.torch import load_file

            for name in ("fsdp", "tp"):
                saved = load_file(str(out / f"{kind}-{name}" / "adapter_model.safetensors"))
                reference_saved = load_file(
                    str(out / f"{kind}-reference" / "adapter_model.safetensors")
                )
                assert saved.keys() == reference_saved.keys()
                result[f"{kind}/{name}_saved_diff"] = max(
                    (saved[k] - reference_saved[k]).abs().max().item() for k in saved
                )
    return result


@pytest.mark.slow
def test_lora_and_dora_under_fsdp2_and_tp_match_single_process(tmp_path):
    from torch.distributed.tensor import Replicate, Shard

    results = run_distributed(
        _lora_parallel_worker, world_size=2, timeout=600, out_dir=str(tmp_path)
    )
    assert results[0]["lora/fsdp"] == results[1]["lora/fsdp"]
    r = results[0]
    for kind in ("lora", "dora"):
        reference = r[f"{kind}/reference"]
        assert r[f"{kind}/reference_eval"] != pytest.approx(reference[0])  # the adapter trained
        for parallel in ("fsdp", "tp"):
            torch.testing.assert_close(r[f"{kind}/{parallel}"], reference, atol=1e-5, rtol=1e-5)
            assert r[f"{kind}/{parallel}_param_diff"] < 1e-5
            assert r[f"{kind}/{parallel}_saved_diff"] < 1e-5
            assert r[f"{kind}/{parallel}_reset_diff"] < 1e-6
            unmerged, merged, unmerged_again = r[f"{kind}/{parallel}_merge_evals"]
            torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(unmerged_again, unmerged, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(unmerged, r[f"{kind}/reference_eval"], atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(
                r[f"{kind}/{parallel}_reset_eval"], r[f"{kind}/reset_eval"], atol=1e-5, rtol=1e-5
            )
            torch.testing.assert_close(
                r[f"{kind}/{parallel}_loaded_eval"],
                r[f"{kind}/reference_eval"],
                atol=1e-5,
                rtol=1e-5,
            )
        placements = r[f"{kind}/placements"]
        # Column-wise layers (q_proj, up_proj): A replicated, B and magnitude sharded on out.
        # Row-wise layers (o_proj, down_proj): A sharded on in, B and magnitude replicated.
        for colwise in ("q_proj", "up_proj"):
            assert placements[f"{colwise}.lora_A"] == (Replicate(),)
            assert placements[f"{colwise}.lora_B"] == (Shard(0),)
        for rowwise in ("o_proj", "down_proj"):
            assert placements[f"{rowwise}.lora_A"] == (Shard(1),)
            assert placements[f"{rowwise}.lora_B"] == (Replicate(),)
        if kind == "dora":
            assert placements["q_proj.lora_magnitude_vector"] == (Shard(0),)
            assert placements["o_proj.lora_magnitude_vector"] == (Replicate(),)
