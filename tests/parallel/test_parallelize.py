"""parallelize() on gloo CPU ranks: every strategy against a single-process fp32 run.

Each launch runs many configurations in one process group (a launch costs seconds), and each
configuration takes three AdamW steps that must give the reference losses within 1e-5 and the
reference first-step gradients.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist
from parallel._equivalence import batches, compare, reference_run
from torch.distributed.tensor.parallel import loss_parallel

from automodel.parallel import (
    ParallelConfig,
    build_mesh,
    clip_grad_norm_,
    global_mean_loss,
    parallelize,
    reduce_data_parallel,
    seed_ranks,
    validate_model,
)
from harness.distributed import run_distributed
from harness.models import DECODER_MODELS, build_tiny_model

LLAMA_CASES: dict[str, dict[str, Any]] = {
    "fsdp": {"dp_shard": 4},
    "hsdp_2x2": {"dp_replicate": 2, "dp_shard": 2},
    "tp_x_replicate": {"dp_replicate": 2, "dp_shard": 1, "tp": 2},
    "fsdp_tp_2x2": {"dp_shard": 2, "tp": 2},
    "fsdp_tp_sp_2x2": {"dp_shard": 2, "tp": 2, "sequence_parallel": True},
    "ac_full": {"dp_shard": 4, "activation_checkpointing": "full"},
    "ac_selective_tp_sp": {
        "dp_shard": 2,
        "tp": 2,
        "sequence_parallel": True,
        "activation_checkpointing": "selective",
    },
    "prefetch_no_reshard": {"dp_shard": 4, "prefetch": 1, "reshard_after_forward": False},
}


def _clip_check(rank: int) -> dict[str, float]:
    """clip_grad_norm_ on an FSDP x TP llama (mixed meshes) vs torch's on the reference."""
    ref = build_tiny_model("llama").train()
    ids = batches()[0]
    ref(input_ids=ids, labels=ids).loss.backward()
    ref_norm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5).item()
    config = ParallelConfig(dp_shard=2, tp=2, sequence_parallel=True)
    mesh = build_mesh(config)
    model = parallelize(build_tiny_model("llama").train(), config, mesh)
    dp = mesh["dp"]
    local = ids.chunk(dp.size())[dp.get_local_rank()]
    model(input_ids=local, labels=local).loss.backward()
    norm = clip_grad_norm_(model.parameters(), 0.5).item()
    inf_norm = clip_grad_norm_(model.parameters(), 1e9, norm_type=float("inf")).item()
    ref_inf = max(p.grad.abs().max().item() for p in ref.parameters())
    grad_diff = 0.0
    for (_, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        full = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grad_diff = max(grad_diff, (full - q.grad).abs().max().item())
    return {"norm": norm, "ref_norm": ref_norm, "inf": inf_norm, "ref_inf": ref_inf,
            "grad_diff": grad_diff}  # fmt: skip


def _helpers_check(rank: int) -> dict[str, Any]:
    mesh = build_mesh(ParallelConfig(dp_shard=2, tp=2))
    seed = seed_ranks(100, mesh)
    draw = torch.rand(1).item()
    tokens = reduce_data_parallel(torch.tensor(float(rank + 1)), mesh)
    mean = global_mean_loss(torch.tensor(float(rank + 1) * 10), rank + 1, mesh)
    try:
        parallelize(build_tiny_model("llama"), ParallelConfig(dp_shard=4), mesh)
        mismatch = ""
    except ValueError as e:
        mismatch = str(e)
    return {"seed": seed, "draw": draw, "tokens": tokens.item(), "mean": mean.item(),
            "mismatch": mismatch}  # fmt: skip


def _mesh_check(rank: int) -> dict[str, Any]:
    """build_mesh on 4 ranks: sizes of every named and flattened dim, local ranks, a bad size."""
    names = ["pp", "dp_replicate", "dp_shard", "cp", "tp", "dp", "dp_shard_cp", "dp_cp", "ep"]
    out: dict[str, Any] = {}
    mesh = build_mesh(ParallelConfig(dp_shard=-1, tp=2, ep=2))
    out["ep_tp"] = {n: mesh[n].size() for n in [*names, "dp_shard_mod_ep"]}
    out["ep_rank"] = mesh["ep"].get_local_rank()
    out["tp_rank"] = mesh["tp"].get_local_rank()
    mesh = build_mesh(ParallelConfig(dp_replicate=2, dp_shard=2))
    out["hsdp"] = {n: mesh[n].size() for n in names}
    out["dp_rank"] = mesh["dp"].get_local_rank()
    try:
        build_mesh(ParallelConfig(dp_shard=3))
    except ValueError as e:
        out["error"] = str(e)
    return out


def _llama_worker(rank: int, world_size: int) -> dict[str, Any]:
    reference = reference_run("llama")
    out: dict[str, Any] = {n: compare("llama", c, reference) for n, c in LLAMA_CASES.items()}
    bf16 = {"dp_shard": 2, "tp": 2, "param_dtype": "bfloat16", "reduce_dtype": "float32"}
    out["bf16"] = compare("llama", bf16, reference)
    out["clip"] = _clip_check(rank)
    out["helpers"] = _helpers_check(rank)
    out["mesh"] = _mesh_check(rank)
    # test_expert's checks (EP, EP inside FSDP, EP x TP) share this launch
    from parallel.test_expert import _ep_worker

    out["expert_parallel"] = _ep_worker(rank, world_size)
    dist.barrier()
    return out


@pytest.mark.slow
def test_llama_strategies_and_expert_parallel_match_single_process() -> None:
    results = run_distributed(_llama_worker, world_size=4, timeout=900)
    from parallel.test_expert import check_ep_results

    check_ep_results([r.pop("expert_parallel") for r in results])
    r = results[0]
    for name in LLAMA_CASES:
        assert r[name]["missing"] == [], name
        assert r[name]["loss_diff"] < 1e-5, (name, r[name])
        assert r[name]["grad_diff"] < 1e-4, (name, r[name])
    # bf16 compute: same trajectory within bf16 resolution (~0.4% relative).
    assert r["bf16"]["loss_diff"] < 0.05 * max(r["bf16"]["ref_losses"]) / 6, r["bf16"]
    assert r["bf16"]["grad_diff"] < 0.1, r["bf16"]
    clip = r["clip"]
    assert clip["norm"] == pytest.approx(clip["ref_norm"], rel=1e-5)
    assert clip["inf"] == pytest.approx(clip["ref_inf"], rel=1e-5)  # both after clipping
    assert clip["grad_diff"] < 1e-6  # grads after clipping match torch's clipping
    helpers = [res["helpers"] for res in results]
    # mesh (pp, dp_replicate, dp_shard, cp, tp) = (1, 1, 2, 1, 2): ranks 0,1 share tp.
    assert [h["seed"] for h in helpers] == [100, 100, 101, 101]
    assert helpers[0]["draw"] == helpers[1]["draw"] != helpers[2]["draw"]
    # dp groups are {0, 2} and {1, 3}.
    assert [h["tokens"] for h in helpers] == [4.0, 6.0, 4.0, 6.0]
    assert helpers[0]["mean"] == pytest.approx((10 + 30) / (1 + 3))
    assert (
        "mesh dim 'tp' has size 2 but config.tp=1" in helpers[0]["mismatch"]
        and "build_mesh(config)" in helpers[0]["mismatch"]
    )
    for rank, res in enumerate(results):
        m = res["mesh"]
        assert m["ep_tp"] == {
            "pp": 1, "dp_replicate": 1, "dp_shard": 2, "cp": 1, "tp": 2, "dp": 2,
            "dp_shard_cp": 2, "dp_cp": 2, "ep": 2, "dp_shard_mod_ep": 1,
        }  # fmt: skip
        assert m["tp_rank"] == rank % 2  # tp is the innermost dim
        assert m["ep_rank"] == rank // 2  # ep borrows dp_shard
        assert m["hsdp"] == {
            "pp": 1, "dp_replicate": 2, "dp_shard": 2, "cp": 1, "tp": 1, "dp": 4,
            "dp_shard_cp": 2, "dp_cp": 4, "ep": 1,
        }  # fmt: skip
        assert m["dp_rank"] == rank
        assert "= 3 != world size 4" in m["error"]


def _architectures_worker(rank: int, world_size: int, names: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name in names:
        reference = reference_run(name)
        out[name] = compare(name, {"tp": 2, "sequence_parallel": True}, reference)
        out[f"{name} tp"] = compare(name, {"tp": 2}, reference)
    phi3 = reference_run("phi3")
    out["phi3 fsdp"] = compare("phi3", {"dp_shard": 2}, phi3)
    # fused qkv_proj / gate_up_proj: sharded weights, gathered outputs (transformers' own plan)
    out["phi3 tp"] = compare("phi3", {"tp": 2}, phi3)
    out["phi3 tp sp"] = compare("phi3", {"tp": 2, "sequence_parallel": True}, phi3)
    config = ParallelConfig(tp=2)
    layer = parallelize(build_tiny_model("phi3"), config, build_mesh(config)).model.layers[0]
    out["phi3 placements"] = {
        name: str(layer.get_submodule(name).weight.placements)
        for name in ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
    }
    # EP inside FSDP is checked on 4 ranks (ep=2 x fsdp=2) in test_expert.py.
    out["loss_parallel"] = _loss_parallel_check()
    # test_context's check of context_parallel's buffer sharding shares this launch
    from parallel.test_context import _cm_shards_like_shard_sequence

    out["context_parallel_shards"] = _cm_shards_like_shard_sequence(rank, world_size)
    dist.barrier()
    return out


def _loss_parallel_check() -> dict[str, Any]:
    """Vocabulary-sharded logits + torch's loss_parallel give the reference loss and grads."""
    ref = build_tiny_model("qwen3").train()
    ids = batches()[0]
    ref_loss = ref(input_ids=ids, labels=ids).loss
    ref_loss.backward()
    config = ParallelConfig(tp=2, sequence_parallel=True, loss_parallel=True)
    model = parallelize(build_tiny_model("qwen3").train(), config, build_mesh(config))
    logits = model(input_ids=ids).logits
    with loss_parallel():
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
    grads = {n: p.grad.full_tensor() for n, p in model.named_parameters()}
    grad_diff = max((grads[n] - p.grad).abs().max().item() for n, p in ref.named_parameters())
    return {"missing": [], "loss_diff": abs(loss.full_tensor().item() - ref_loss.item()),
            "grad_diff": grad_diff, "sharded": type(logits).__name__}  # fmt: skip


@pytest.mark.slow
def test_automatic_plan_every_decoder_architecture() -> None:
    results = run_distributed(
        _architectures_worker, world_size=2, timeout=900, names=DECODER_MODELS
    )
    from parallel.test_context import CM_SHARDS_ON_2_RANKS

    assert [r.pop("context_parallel_shards") for r in results] == CM_SHARDS_ON_2_RANKS
    assert results[0]["loss_parallel"]["sharded"] == "DTensor"
    placements = results[0].pop("phi3 placements")
    assert placements == {
        "self_attn.qkv_proj": "(Shard(dim=0),)", "self_attn.o_proj": "(Shard(dim=1),)",
        "mlp.gate_up_proj": "(Shard(dim=0),)", "mlp.down_proj": "(Shard(dim=1),)",
    }  # fmt: skip
    for name, r in results[0].items():
        assert r["missing"] == [], name
        assert r["loss_diff"] < 1e-5, (name, r)
        assert r["grad_diff"] < 1e-4, (name, r)


@pytest.mark.parametrize(
    ("name", "config", "match"),
    [
        (
            "llama",
            {"tp": 4},
            r"tp=4 does not divide the 2 key/value heads .* choose tp among \[1, 2\]",
        ),
        ("llama", {"tp": 3}, r"tp=3 does not divide the 4 attention heads"),
        ("llama", {"pp": 3}, r"pp=3 is larger than the 2 layers .* use pp <= 2"),
        ("mixtral", {"ep": 3}, r"ep=3 does not divide the 4 experts of model.layers.0.mlp.experts"),
        ("llama", {"ep": 2}, r"ep=2 but LlamaForCausalLM has no MoE experts"),
        ("phi3", {"tp": 3}, r"tp=3 does not divide the \d+ "),
    ],
)
def test_model_does_not_fit(name: str, config: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        validate_model(build_tiny_model(name), ParallelConfig(**config))
