"""MoE checkpoints in the per-expert Hugging Face layout: from one process and from EP=2."""

from __future__ import annotations

import copy
import importlib.util
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import transformers
from safetensors import safe_open

from automodel.ckpt import load, save
from automodel.core.moe import moe_key_map, patch_moe_experts
from harness import MOE_MODELS, build_tiny_model, run_distributed


def _keys(folder) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})  # noqa: SIM118
    return out


@pytest.mark.parametrize("name", MOE_MODELS)
def test_save_writes_transformers_per_expert_layout_and_loads_back(name, tmp_path):
    model = build_tiny_model(name)
    model.save_pretrained(tmp_path / "hf")
    save(model, tmp_path / "ours", key_map=moe_key_map(model.config))
    theirs, ours = _keys(tmp_path / "hf"), _keys(tmp_path / "ours")
    assert sorted(ours) == sorted(theirs)
    for key, tensor in theirs.items():
        assert torch.equal(ours[key], tensor), key

    reloaded = build_tiny_model(name, seed=123)
    result = load(reloaded, tmp_path / "ours", key_map=moe_key_map(reloaded.config))
    assert result.missing_keys == [] and result.unexpected_keys == []
    for (k, a), (_, b) in zip(
        model.state_dict().items(), reloaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), k


def _triton_moe_pairs() -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Returns ``(name, triton, torch)`` results of ``automodel.kernels.moe``'s Triton kernels.

    Needs TRITON_INTERPRET=1 before Triton is imported (Triton decides at decoration time), so it
    runs inside this file's 2-rank launch rather than in a process of its own. Forward and the
    gradients of ``x`` and the routing weights, on both backends, for a one-block row and for rows
    of several 16-column blocks (the 2D grid forward and the column loop backward that rows wider
    than 4096 take on a GPU); then ``swiglu_packed`` and its gradient, on one block and on
    several 16-column blocks per half.
    """
    if importlib.util.find_spec("triton") is None:
        return []
    from automodel.kernels.moe import (
        _triton_gated,
        _triton_permute,
        permute,
        swiglu_packed,
        unpermute,
    )

    torch.manual_seed(2)
    pairs = []
    for tokens, top_k, experts, hidden, block in ((7, 3, 4, 37, 4096), (5, 2, 5, 37, 16)):
        _triton_permute._MAX_BLOCK = block
        x = torch.randn(tokens, hidden, requires_grad=True)
        indices = torch.rand(tokens, experts).argsort(-1)[:, :top_k]
        weights = torch.rand(tokens, top_k, requires_grad=True)
        expert_scale = torch.randn(tokens * top_k, hidden)  # stands for the experts' MLPs
        upstream = torch.randn(tokens, hidden)
        results = {}
        for backend in ("torch", "triton"):
            permuted, row_map, _ = permute(x, indices, experts, backend=backend)
            out = unpermute(permuted * expert_scale, row_map, weights, backend=backend)
            grads = torch.autograd.grad(out, (x, weights), upstream)
            results[backend] = (permuted, out, *grads)
        names = ("permuted", "out", "d_x", "d_weights")
        for name, got, want in zip(names, results["triton"], results["torch"], strict=True):
            pairs.append((f"{name} (block {block})", got.detach(), want.detach()))
    _triton_permute._MAX_BLOCK = 4096
    for block in (2048, 16):
        _triton_gated._MAX_BLOCK = block
        gate_up = (torch.randn(6, 2 * 37) * 3).requires_grad_(True)
        upstream = torch.randn(6, 37)
        for backend in ("triton", "torch"):
            out = swiglu_packed(gate_up, backend=backend)
            (grad,) = torch.autograd.grad(out, gate_up, upstream)
            results[backend] = (out.detach(), grad)
        for name, got, want in zip(("swiglu", "d_gate_up"), results["triton"], results["torch"]):
            pairs.append((f"{name} (block {block})", got, want))
    _triton_gated._MAX_BLOCK = 2048
    return pairs


def _ep_save_worker(
    rank: int, world_size: int, names: list[str], out: str
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    out_dir = out
    kernel_pairs: list[tuple[str, torch.Tensor, torch.Tensor]] = []
    from torch.distributed.device_mesh import init_device_mesh

    from automodel.parallel.expert import apply_expert_parallel

    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("ep",))
    for name in names:  # every model in one launch: one process group, one interpreter start
        model = build_tiny_model(name)  # same seed on every rank
        patch_moe_experts(model)
        apply_expert_parallel(model, mesh)
        save(model, f"{out}/{name}", key_map=moe_key_map(model.config))
        dist.barrier()
    # the public API: from_config(parallel=ep) groups the experts before sharding them, so the
    # all-to-all forward runs core's grouped GEMMs through `grouped_expert_mlp`
    from automodel.core import AutoModelForCausalLM
    from automodel.parallel.expert import find_expert_modules

    model = AutoModelForCausalLM.from_config(
        build_tiny_model(names[0]).config, parallel={"dp_shard": world_size, "ep": world_size}
    )
    experts = [m for _, m in find_expert_modules(model)]
    assert experts and all(callable(getattr(m, "grouped_expert_mlp", None)) for m in experts)
    ids = torch.randint(6, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(ids, labels=ids)
    assert torch.isfinite(out.loss)
    # save_pretrained of the EP model writes the Hub's per-expert layout, which transformers loads
    model.save_pretrained(f"{out_dir}/public")
    if rank == 0:
        saved = _keys(Path(out_dir) / "public")
        assert any(".experts.0." in k for k in saved), sorted(saved)
        assert not any(k.endswith(("experts.gate_up_proj", "experts.down_proj")) for k in saved)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(f"{out_dir}/public").eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, out.logits, atol=1e-5, rtol=1e-5)
    else:  # meanwhile, on the other rank (CI has 2 cores): the Triton kernels' parity check
        kernel_pairs = _triton_moe_pairs()
    dist.barrier()
    return kernel_pairs


@pytest.mark.slow
def test_save_from_expert_parallel_loads_in_transformers(tmp_path):
    out = tmp_path / "ep"
    env = {"TRITON_INTERPRET": "1"}  # for _triton_moe_pairs; CPU "auto" paths stay torch
    results = run_distributed(
        _ep_save_worker, world_size=2, names=list(MOE_MODELS), out=str(out), env=env
    )
    if importlib.util.find_spec("triton") is not None:
        assert results[1], "the Triton kernels' check returned nothing"
        for name, got, want in results[1]:
            torch.testing.assert_close(
                got, want, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}"
            )
    ids = torch.randint(6, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    for name in MOE_MODELS:
        reference = build_tiny_model(name)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out / name).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, atol=0, rtol=0)
        assert copy.deepcopy(_keys(out / name)).keys() == _keys(out / name).keys()
