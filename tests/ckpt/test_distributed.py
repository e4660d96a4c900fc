"""Distributed save/load on gloo CPU ranks: FSDP2, TP, 2D, uneven shards, resharding on load.

One 2-rank and one 4-rank process group cover: 2-rank FSDP2 save (model + optimizer through
CheckpointManager) -> 1-process load and transformers; -> 4-rank 2x2 FSDP+TP load of model and
optimizer, exactly equal; a sharded ``save_pretrained`` folder -> FSDP2 model; raw DTensors with
uneven Shard(0)/Shard(1)/Replicate placements -> safetensors -> other placements.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from harness.distributed import run_distributed
from harness.models import build_tiny_model

pytestmark = pytest.mark.slow

TOKENS = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 11], [5, 6, 7, 8, 9, 10, 11, 12]])
RAW = {
    "rows": (torch.arange(35.0).reshape(7, 5), "shard0"),  # 7 rows over 2 ranks: uneven
    "cols": (torch.arange(21.0).reshape(3, 7) * -1, "shard1"),
    "bias": (torch.linspace(0, 1, 5), "replicate"),
    "scalar": (torch.tensor(3.5), "plain"),
    "ids": (torch.arange(6, dtype=torch.int64), "plain"),
}


def _full_states(model, optimizer):
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return (
        get_model_state_dict(model, options=options),
        get_optimizer_state_dict(model, optimizer, options=options),
    )


def _fsdp_model(seed, mesh):
    from torch.distributed.fsdp import fully_shard

    model = build_tiny_model("llama", seed=seed).train()
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _placements(kind):
    from torch.distributed.tensor import Replicate, Shard

    return {"shard0": [Shard(0)], "shard1": [Shard(1)], "replicate": [Replicate()]}[kind]


def _save_2_ranks(rank, world_size, root, hf_dir):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import distribute_tensor

    from automodel.ckpt import CheckpointManager, load, save

    mesh = init_device_mesh("cpu", (world_size,))
    model = _fsdp_model(seed=0, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss = model(TOKENS, labels=TOKENS).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    manager = CheckpointManager(Path(root) / "run")
    manager.save(1, model=model, optimizer=optimizer)
    # torch's own per-rank sharded safetensors layout, a `merge` source (checked by the caller).
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    writer = HuggingFaceStorageWriter(str(Path(root) / "per_rank"), save_distributed=True)
    untied = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    dcp.save(untied, storage_writer=writer)  # torch's writer refuses tied tensors
    model_sd, optim_sd = _full_states(model, optimizer)

    # A save_pretrained folder with several small shards -> FSDP2 model, each rank its slices.
    from_hf = _fsdp_model(seed=7, mesh=mesh)
    load(from_hf, hf_dir)
    from_hf_sd, _ = _full_states(from_hf, torch.optim.SGD(from_hf.parameters()))

    # Raw DTensors with uneven and column shards, replicated and plain tensors.
    raw = {
        k: (t.clone() if kind == "plain" else distribute_tensor(t, mesh, _placements(kind)))
        for k, (t, kind) in RAW.items()
    }
    save(raw, Path(root) / "raw", max_shard_size=64)
    swapped = {"shard0": "shard1", "shard1": "replicate", "replicate": "shard0", "plain": "plain"}
    targets = {
        k: (
            torch.zeros_like(t)
            if kind == "plain"
            else distribute_tensor(torch.zeros_like(t), mesh, _placements(swapped[kind]))
        )
        for k, (t, kind) in RAW.items()
        if t.dim() > 0 or kind == "plain"
    }
    load(targets, Path(root) / "raw")
    reloaded = {k: (v if k in ("scalar", "ids") else v.full_tensor()) for k, v in targets.items()}
    dist.barrier()
    return {"model": model_sd, "optim": optim_sd, "from_hf": from_hf_sd, "raw": reloaded}


def _load_4_ranks_2d(rank, world_size, root):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        RowwiseParallel,
        parallelize_module,
    )

    from automodel.ckpt import CheckpointManager

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    model = build_tiny_model("llama", seed=3).train()
    plan = {
        "self_attn.q_proj": ColwiseParallel(),
        "self_attn.k_proj": ColwiseParallel(),
        "self_attn.v_proj": ColwiseParallel(),
        "self_attn.o_proj": RowwiseParallel(),
        "mlp.gate_proj": ColwiseParallel(),
        "mlp.up_proj": ColwiseParallel(),
        "mlp.down_proj": RowwiseParallel(),
    }
    for layer in model.model.layers:
        parallelize_module(layer, mesh["tp"], plan)
        fully_shard(layer, mesh=mesh["dp"])
    fully_shard(model, mesh=mesh["dp"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step = CheckpointManager(Path(root) / "run").load("latest", model=model, optimizer=optimizer)
    model_sd, optim_sd = _full_states(model, optimizer)
    return {"step": step, "model": model_sd, "optim": optim_sd}


def _assert_equal(actual, expected, path=""):
    if isinstance(expected, dict):
        assert actual.keys() == expected.keys(), path
        for k in expected:
            _assert_equal(actual[k], expected[k], f"{path}.{k}")
    elif isinstance(expected, list):
        assert len(actual) == len(expected), path
        for i, (a, e) in enumerate(zip(actual, expected)):
            _assert_equal(a, e, f"{path}[{i}]")
    elif torch.is_tensor(expected):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=path)
    else:
        assert actual == expected, path


def test_fsdp_save_then_1_process_and_2d_fsdp_tp_load(tmp_path, tiny_model_dir):
    from automodel.ckpt import load, merge

    hf_dir = tiny_model_dir("llama", max_shard_size="30KB")
    saved = run_distributed(_save_2_ranks, 2, root=str(tmp_path), hf_dir=str(hf_dir))[0]
    step_dir = tmp_path / "run" / "step_1"

    # 1 process: plain model and transformers see the trained weights.
    plain = build_tiny_model("llama", seed=5)
    load(plain, step_dir)
    _assert_equal(
        {k: v for k, v in plain.state_dict().items() if k in saved["model"]}, saved["model"]
    )
    hf = transformers.AutoModelForCausalLM.from_pretrained(step_dir)
    _assert_equal({k: v for k, v in hf.state_dict().items() if k in saved["model"]}, saved["model"])

    # 2 ranks FSDP2 -> 4 ranks 2x2 FSDP+TP: model and optimizer state exactly equal.
    loaded = run_distributed(_load_4_ranks_2d, 4, root=str(tmp_path))[0]
    assert loaded["step"] == 1
    _assert_equal(loaded["model"], saved["model"])
    _assert_equal(loaded["optim"], saved["optim"])

    # Per-rank files of an FSDP2 model (DCP's HuggingFaceStorageWriter) -> one HF folder.
    merged = merge(tmp_path / "per_rank", tmp_path / "merged")
    assert len(list((tmp_path / "per_rank").glob("shard-*.safetensors"))) == 2
    merged_model = build_tiny_model("llama", seed=5)
    load(merged_model, merged)
    _assert_equal(
        {k: v for k, v in merged_model.state_dict().items() if k in saved["model"]}, saved["model"]
    )

    reference = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).state_dict()
    _assert_equal(saved["from_hf"], {k: reference[k] for k in saved["from_hf"]})

    index = json.loads((tmp_path / "raw" / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["rows"] == "model-00001-of-00004.safetensors"
    raw_files = load_file(tmp_path / "raw" / "model-00001-of-00004.safetensors")
    assert list(raw_files) == ["rows"]  # 140 bytes > 64: a file of its own
    torch.testing.assert_close(raw_files["rows"], RAW["rows"][0], rtol=0, atol=0)
    for name, (tensor, _) in RAW.items():
        if name in saved["raw"]:
            _assert_equal(saved["raw"][name], tensor, name)
