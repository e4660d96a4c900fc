"""Expert parallelism on gloo CPU ranks: equal to the single-process model, bad configs rejected."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from automodel.parallel.expert import apply_expert_parallel, find_expert_modules
from harness import build_tiny_model, run_distributed, tiny_config

_STEPS = 3


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _ep_matches_single_process(
    rank: int, world_size: int, names: list[str], device: str = "cpu"
) -> tuple[dict[str, float], list[str]]:
    """EP over all ranks; each rank gets its own slice of the batch; compares with the full model."""
    mesh = init_device_mesh(device, (world_size,), mesh_dim_names=("ep",))
    worst: dict[str, float] = {}
    for name in names:
        reference = build_tiny_model(name, seed=0).to(device).train()
        model = apply_expert_parallel(copy.deepcopy(reference), mesh)
        local_experts = model.get_submodule(find_expert_modules(model)[0][0]).gate_up_proj
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

            torch.testing.assert_close(loss, ref_out.loss.detach(), rtol=0, atol=1e-5)
            ref_logits = ref_out.logits.detach().chunk(world_size)[rank]
            torch.testing.assert_close(out.logits.detach(), ref_logits, rtol=1e-4, atol=1e-4)
            ref_params = dict(reference.named_parameters())
            for fqn, p in model.named_parameters():
                assert p.grad is not None, f"{name} step {step}: no gradient for {fqn}"
                torch.testing.assert_close(
                    _full(p.grad), ref_params[fqn].grad, rtol=1e-4, atol=1e-5, msg=fqn
                )
            diffs.append(float((loss - ref_out.loss.detach()).abs()))
            ref_opt.step()
            ref_opt.zero_grad()
            opt.step()
            opt.zero_grad()
        worst[name] = max(diffs)
    return worst, _bad_configs(mesh)


def _ep_worker(rank: int, world_size: int, device: str = "cpu") -> dict[str, Any]:
    """Every EP check of one launch: EP over all ranks, bad configs, then EP=2 inside FSDP."""
    worst, messages = _ep_matches_single_process(
        rank, world_size, names=["mixtral", "qwen3_moe"], device=device
    )
    ep_fsdp = _ep_fsdp_matches_single_process(rank, world_size, device=device)
    return {"worst": worst, "messages": messages, "ep_fsdp": ep_fsdp}


@pytest.mark.slow
def test_expert_parallel_and_ep_inside_fsdp_equal_single_process() -> None:
    # 4 gloo ranks: ep=4 over mixtral and qwen3_moe (4 experts each), then ep=2 x fsdp=2, whose
    # expert gradients are divided by a factor FSDP would reduce with PREMUL_SUM (not on gloo).
    results = run_distributed(_ep_worker, 4, timeout=600)
    for r in results:
        assert set(r["worst"]) == {"mixtral", "qwen3_moe"}
        assert all(diff <= 1e-5 for diff in r["worst"].values()), r["worst"]
        # bad configs: 4 ranks cannot split 3 experts; a dense model has no experts
        assert len(r["messages"]) == 2
        assert "ep=4 does not divide the 3 experts" in r["messages"][0]
        assert "Fix: choose ep among the divisors of 3" in r["messages"][0]
        assert "found no MoE experts module" in r["messages"][1]
        # each rank checked loss (1e-5) and every full gradient against the reference per step
        assert len(r["ep_fsdp"]) == _STEPS
        assert r["ep_fsdp"] == results[0]["ep_fsdp"]


def _bad_configs(mesh: Any) -> list[str]:
    """ValueErrors of apply_expert_parallel on a 2-rank ep mesh."""
    import transformers

    three_experts = tiny_config("mixtral")
    three_experts.num_local_experts = 3
    messages = []
    for model in (
        transformers.AutoModelForCausalLM.from_config(three_experts),
        build_tiny_model("llama"),
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
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=0, atol=1e-5)
        ref_params = dict(reference.named_parameters())
        for fqn, p in model.named_parameters():
            assert p.grad is not None, f"step {step}: no gradient for {fqn}"
            torch.testing.assert_close(
                _full(p.grad),
                ref_params[fqn].grad,
                rtol=1e-4,
                atol=1e-6 if step == 0 else 1e-5,
                msg=lambda m, fqn=fqn, step=step: f"step {step} {fqn}: {m}",
            )
        losses.append(float(loss))
        ref_opt.step()
        ref_opt.zero_grad()
        opt.step()
        opt.zero_grad()
    return losses


# ----------------------------------------------------------------------------------------------
# GPU: the same equivalence checks with NCCL, launched with torchrun on this file.

_REPO = Path(__file__).resolve().parents[2]


def _torchrun(nproc: int, check: str) -> None:
    if torch.cuda.device_count() < nproc:
        pytest.skip(f"needs {nproc} GPUs")
    src = os.pathsep.join(str(p) for p in sorted((_REPO / "packages").glob("*/src")))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, str(_REPO / "tests")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    proc = subprocess.run(
        [*cmd, "--nproc-per-node", str(nproc), __file__, check],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-8000:]


@pytest.mark.gpu
@pytest.mark.slow
def test_expert_parallel_equals_single_process_nccl() -> None:
    _torchrun(2, "ep")


@pytest.mark.gpu
@pytest.mark.slow
def test_expert_parallel_inside_fsdp_equals_single_process_nccl() -> None:
    _torchrun(4, "ep_fsdp")


def _gpu_main(check: str) -> None:
    local_rank = int(os.environ["LOCAL_RANK"])
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if check == "ep":
        _ep_matches_single_process(rank, world, names=["mixtral", "qwen3_moe"], device="cuda")
    else:
        _ep_fsdp_matches_single_process(rank, world, device="cuda")
    dist.destroy_process_group()


if __name__ == "__main__":
    _gpu_main(sys.argv[1])
