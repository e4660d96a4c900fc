"""MoE checkpoints in the per-expert Hugging Face layout: from one process and from EP=2."""

from __future__ import annotations

import copy
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


def _ep_save_worker(rank: int, world_size: int, names: list[str], out: str) -> None:
    out_dir = out
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
    dist.barrier()


@pytest.mark.slow
def test_save_from_expert_parallel_loads_in_transformers(tmp_path):
    out = tmp_path / "ep"
    run_distributed(_ep_save_worker, world_size=2, names=list(MOE_MODELS), out=str(out))
    ids = torch.randint(6, 384, (2, 16), generator=torch.Generator().manual_seed(0))
    for name in MOE_MODELS:
        reference = build_tiny_model(name)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(out / name).eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(ids).logits, reference(ids).logits, atol=0, rtol=0)
        assert copy.deepcopy(_keys(out / name)).keys() == _keys(out / name).keys()
