"""Expert parallelism on gloo CPU ranks: equal to the single-process model, bad configs rejected."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.distributed as dist
from parallel._gpu import GRAD_RTOL, LOSS_ATOL, gpu_world, init_nccl, run_nccl
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from automodel.parallel.expert import apply_expert_parallel, find_expert_modules
from harness import build_tiny_model, tiny_config

_STEPS = 3


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _tolerances(device: str) -> dict[str, float]:
    """Returns fp32 tolerances: tight on CPU, looser for GPU kernels' reduction orders."""
    if device == "cpu":
        return {"loss": 1e-5, "logits": 1e-4, "rtol": 1e-4, "atol": 1e-5, "atol_later": 1e-5}
    return {"loss": LOSS_ATOL, "logits": 5e-3, "rtol": GRAD_RTOL, "atol": 1e-3, "atol_later": 1e-3}


def _ep_matches_single_process(
    rank: int, world_size: int, names: list[str], device: str = "cpu"
) -> tuple[dict[str, float], list[str], dict[str, float]]:
    """EP over all ranks; each rank gets its own slice of the batch; compares with the full model.

    Returns the worst loss difference per model, the bad-config messages, and per model the
    largest output difference of the EP experts with dropped slots (:func:`_dropped_slots_diff`).
    """
    mesh = init_device_mesh(device, (world_size,), mesh_dim_names=("ep",))
    tol = _tolerances(device)
    worst: dict[str, float] = {}
    dropped: dict[str, float] = {}
    for name in names:
        reference = build_tiny_model(name, seed=0).to(device).train()
        if name == "qwen3_moe":  # EP must run core's grouped GEMMs through `grouped_expert_mlp`
            from automodel.core.moe import patch_moe_experts

            assert patch_moe_experts(reference)
        model = apply_expert_parallel(copy.deepcopy(reference), mesh)
        experts_module = model.get_submodule(find_expert_modules(model)[0][0])
        assert callable(getattr(experts_module, "grouped_expert_mlp", None)) == (
            name == "qwen3_moe"
        )
        experts_fqn = find_expert_modules(model)[0][0]
        dropped[name] = _dropped_slots_diff(
            reference.get_submodule(experts_fqn), model.get_submodule(experts_fqn), rank, device
        )
        local_experts = model.get_submodule(experts_fqn).gate_up_proj
        assert isinstance(local_experts, DTensor)
        assert local_experts.to_local().shape[0] == local_experts.shape[0] // world_size

        gen = torch.Generator().manual_seed(1)
        batch = torch.randint(5, 384, (2 * world_size, 12), generator=gen).to(device)
        local = batch.chunk(world_size)[rank]
        ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, foreach=False)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, foreach=False)
        diffs = []
        for step in range(_STEPS):
            ref_out = reference(batch, labels=batch)
            ref_out.loss.backward()
            out = model(local, labels=local)
            (out.loss / world_size).backward()
            for p in model.parameters():
                if not isinstance(p, DTensor) and p.grad is not None:
                    dist.all_reduce(p.grad)  # data-parallel reduction of the replicated params
            loss = out.loss.detach().clone()
            dist.all_reduce(loss)
            loss /= world_size

            torch.testing.assert_close(loss, ref_out.loss.detach(), rtol=0, atol=tol["loss"])
            ref_logits = ref_out.logits.detach().chunk(world_size)[rank]
            torch.testing.assert_close(
                out.logits.detach(), ref_logits, rtol=tol["logits"], atol=tol["logits"]
            )
            ref_params = dict(reference.named_parameters())
            for fqn, p in model.named_parameters():
                assert p.grad is not None, f"{name} step {step}: no gradient for {fqn}"
                torch.testing.assert_close(
                    _full(p.grad), ref_params[fqn].grad, rtol=tol["rtol"], atol=tol["atol"], msg=fqn
                )
            diffs.append(float((loss - ref_out.loss.detach()).abs()))
            ref_opt.step()
            ref_opt.zero_grad()
            opt.step()
            opt.zero_grad()
        worst[name] = max(diffs)
    return worst, _bad_configs(mesh), dropped


def _ep_worker(rank: int, world_size: int, device: str = "cpu") -> dict[str, Any]:
    """Every EP check of one launch: EP over all ranks, bad configs, EP=2 inside FSDP, EP x TP."""
    worst, messages, dropped = _ep_matches_single_process(
        rank, world_size, names=["mixtral", "qwen3_moe"], device=device
    )
    ep_fsdp = _ep_fsdp_matches_single_process(rank, world_size, device=device)
    return {"worst": worst, "messages": messages, "ep_fsdp": ep_fsdp, "dropped": dropped,
            "ep_tp": _ep_tp_matches_single_process(device)}  # fmt: skip


def _dropped_slots_diff(reference: Any, experts: Any, rank: int, device: str) -> float:
    """Returns the largest difference of the EP ``experts`` with dropped slots vs ``reference``.

    A router may mark a slot no expert takes with index ``E``: it must add nothing, on both EP
    paths (mixtral: the all-to-all forward's own permutation; qwen3_moe: core's permute hooks).
    ``reference`` (the same weights, one process) routes those slots to expert 0 with weight 0.
    """
    num_experts, _, hidden = reference.gate_up_proj.shape
    gen = torch.Generator().manual_seed(2 + rank)
    x = torch.randn(6, hidden, generator=gen).to(device)
    index = torch.randint(0, num_experts, (6, 2), generator=gen).to(device)
    index[::2, 1] = num_experts  # dropped
    weights = torch.rand(6, 2, generator=gen).to(device)
    with torch.no_grad():
        got = experts(x, index, weights)
        dropped = index == num_experts
        expected = reference(x, index.masked_fill(dropped, 0), weights.masked_fill(dropped, 0))
    return float((got - expected).abs().max())


# ep=2 x tp=2 on 4 ranks: attention and dense parts TP over tp, experts EP over the dp ranks
_EP_TP_CASES: dict[str, tuple[str, dict[str, Any]]] = {
    "mixtral ep2 tp2": ("mixtral", {"dp_shard": 2, "tp": 2, "ep": 2}),
    "qwen3_moe ep2 tp2 sp": ("qwen3_moe", {"dp_shard": 2, "tp": 2, "ep": 2,
                                           "sequence_parallel": True}),
}  # fmt: skip


def _ep_tp_matches_single_process(device: str = "cpu") -> dict[str, Any]:
    """EP x TP (+SP) through ``parallelize``: placements, then 3 AdamW steps vs one process."""
    from parallel._equivalence import compare, reference_run

    from automodel.parallel import ParallelConfig, build_mesh, parallelize

    config = ParallelConfig(dp_shard=2, tp=2, ep=2)
    mesh = build_mesh(config, device_type=device)
    layer = parallelize(build_tiny_model("mixtral").to(device), config, mesh).model.layers[0]
    experts = layer.mlp.experts.gate_up_proj
    out: dict[str, Any] = {
        "q_proj": (layer.self_attn.q_proj.weight.device_mesh.mesh_dim_names,
                   str(layer.self_attn.q_proj.weight.placements)),
        "experts": (experts.shape[0], experts.to_local().shape[0]),
    }  # fmt: skip
    for label, (name, kwargs) in _EP_TP_CASES.items():
        out[label] = compare(name, kwargs, reference_run(name, device), device)
    return out


def check_ep_results(results: list[dict[str, Any]]) -> None:
    """Asserts the CPU results of ``_ep_worker`` on 4 gloo ranks (one per rank).

    The launch is shared: test_parallelize.test_llama_strategies_and_expert_parallel_match_single_process runs
    ``_ep_worker`` after its llama strategies (a launch costs each rank seconds of imports):
    ep=4 over mixtral and qwen3_moe (4 experts each), then ep=2 x fsdp=2, whose expert gradients
    are divided by a factor FSDP would reduce with PREMUL_SUM (not on gloo), then ep=2 x tp=2
    (mixtral) and ep=2 x tp=2 + SP (qwen3_moe) through parallelize. The ep=4 models are also
    checked, right after sharding, on slots a router dropped (index E) on both EP paths.
    """
    for r in results:
        assert set(r["worst"]) == {"mixtral", "qwen3_moe"}
        assert all(diff <= 1e-5 for diff in r["worst"].values()), r["worst"]
        # bad configs: 4 ranks cannot split 3 experts; a dense model has no experts; expert LoRA
        assert len(r["messages"]) == 3
        assert "carries a LoRA adapter on its experts" in r["messages"][2]
        assert "ep=4 does not divide the 3 experts" in r["messages"][0]
        assert "Fix: choose ep among the divisors of 3" in r["messages"][0]
        assert "found no MoE experts module" in r["messages"][1]
        # each rank checked loss (1e-5) and every full gradient against the reference per step
        assert len(r["ep_fsdp"]) == _STEPS
        assert r["ep_fsdp"] == results[0]["ep_fsdp"]
        _check_ep_tp(r["ep_tp"], loss_atol=1e-5, grad_rtol=1e-4)
        assert set(r["dropped"]) == {"mixtral", "qwen3_moe"}
        assert all(diff <= 1e-6 for diff in r["dropped"].values()), r["dropped"]


def _check_ep_tp(r: dict[str, Any], loss_atol: float, grad_rtol: float) -> None:
    """Asserts the EP x TP results: placements, and losses and gradients of every case."""
    # FSDP over dp_shard=2 and TP over tp=2 for attention; 4 experts, 2 per ep rank (ep = dp)
    # q_proj: FSDP's (strided) shard over dp, then the column shard over tp
    dims, placements = r["q_proj"]
    assert dims == ("dp_shard_cp", "tp") and placements.endswith(", Shard(dim=0))"), r["q_proj"]
    assert r["experts"] == (4, 2), r["experts"]
    for label in _EP_TP_CASES:
        assert r[label]["missing"] == [], (label, r[label])
        assert r[label]["loss_diff"] < loss_atol, (label, r[label])
        assert r[label]["grad_diff"] < grad_rtol, (label, r[label])


def _bad_configs(mesh: Any) -> list[str]:
    """ValueErrors of apply_expert_parallel on a 2-rank ep mesh."""
    import transformers

    three_experts = tiny_config("mixtral")
    three_experts.num_local_experts = 3
    from automodel.core.peft import LoraConfig, apply_peft

    adapted = apply_peft(build_tiny_model("mixtral"), LoraConfig(rank=2, target_modules=["w1"]))
    messages = []
    for model in (
        transformers.AutoModelForCausalLM.from_config(three_experts),
        build_tiny_model("llama"),
        adapted,  # LoRA on the experts: the all-to-all forward would ignore it
    ):
        try:
            apply_expert_parallel(model, mesh)
        except ValueError as err:
            messages.append(str(err))
    return messages


def test_find_expert_modules_by_structure() -> None:
    found = [fqn for fqn, _ in find_expert_modules(build_tiny_model("qwen3_moe"))]
    assert found == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert find_expert_modules(build_tiny_model("llama")) == []


def _ep_fsdp_matches_single_process(rank: int, world_size: int, device: str = "cpu") -> list[float]:
    """EP=2 inside FSDP over 4 ranks through ``parallelize``; each rank takes a quarter batch."""
    from automodel.parallel import ParallelConfig, build_mesh, parallelize

    config = ParallelConfig(dp_shard=world_size, ep=2)
    mesh = build_mesh(config, device_type=device)
    tol = _tolerances(device)
    reference = build_tiny_model("mixtral", seed=0).to(device).train()
    model = parallelize(copy.deepcopy(reference), config, mesh)
    experts = model.get_submodule(find_expert_modules(model)[0][0]).gate_up_proj
    assert isinstance(experts, DTensor) and experts.shape[0] == 4
    # 4 experts: 2 per ep rank, each ep shard FSDP-sharded again over the other 2 dp ranks
    assert experts.device_mesh.ndim == 2 and experts.to_local().shape[0] == 1, experts.placements
    gen = torch.Generator().manual_seed(1)
    batch = torch.randint(5, 384, (world_size, 12), generator=gen).to(device)
    dp_rank = mesh["dp"].get_local_rank()
    local = batch[dp_rank : dp_rank + 1]
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=1e-2, foreach=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(_STEPS):
        ref_loss = reference(batch, labels=batch).loss
        ref_loss.backward()
        loss = model(local, labels=local).loss
        loss.backward()
        loss = loss.detach().clone()
        dist.all_reduce(loss)
        loss /= world_size
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=0, atol=tol["loss"])
        ref_params = dict(reference.named_parameters())
        for fqn, p in model.named_parameters():
            assert p.grad is not None, f"step {step}: no gradient for {fqn}"
            torch.testing.assert_close(
                _full(p.grad),
                ref_params[fqn].grad,
                rtol=tol["rtol"],
                atol=tol["atol"] / 10 if step == 0 else tol["atol_later"],
                msg=lambda m, fqn=fqn, step=step: f"step {step} {fqn}: {m}",
            )
        losses.append(float(loss))
        ref_opt.step()
        ref_opt.zero_grad()
        opt.step()
        opt.zero_grad()
    return losses


# ----------------------------------------------------------------------------------------------
# GPU: the same checks with NCCL, one process per GPU.


def _ep_gpu_worker(rank: int, world_size: int) -> dict[str, Any]:
    device = init_nccl()
    if world_size == 4:
        out = _ep_worker(rank, world_size, device)
    else:
        worst, messages, dropped = _ep_matches_single_process(
            rank, world_size, names=["mixtral", "qwen3_moe"], device=device
        )
        out = {"worst": worst, "messages": messages, "ep_fsdp": None, "dropped": dropped}
    dist.barrier()
    dist.destroy_process_group()
    return out


@pytest.mark.gpu
@pytest.mark.slow
def test_expert_parallel_ep_inside_fsdp_and_ep_x_tp_equal_single_gpu_nccl() -> None:
    # 4 GPUs: ep=4, then ep=2 x fsdp=2 (NCCL's PREMUL_SUM path), then ep=2 x tp=2 (+SP) of
    # mixtral and qwen3_moe; 2 GPUs: ep=2 only.
    world = gpu_world()
    results = run_nccl(_ep_gpu_worker, world, timeout=180)
    for r in results:
        assert set(r["worst"]) == {"mixtral", "qwen3_moe"}
        assert all(diff <= LOSS_ATOL for diff in r["worst"].values()), r["worst"]
        assert len(r["messages"]) == 3
        assert "carries a LoRA adapter on its experts" in r["messages"][2]
        assert set(r["dropped"]) == {"mixtral", "qwen3_moe"}
        assert all(diff <= 1e-4 for diff in r["dropped"].values()), r["dropped"]
        if world == 4:
            assert len(r["ep_fsdp"]) == _STEPS
            _check_ep_tp(r["ep_tp"], loss_atol=LOSS_ATOL, grad_rtol=GRAD_RTOL)
