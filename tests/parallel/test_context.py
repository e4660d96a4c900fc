"""Context parallelism: the load-balanced sharding on CPU; the loss against cp=1 on 2 GPUs.

The GPU test launches one NCCL process per GPU (``parallel._gpu.run_nccl``): ring attention exists
only for the CUDA SDPA kernels.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from parallel._gpu import gpu_world, init_nccl, run_nccl
from torch.distributed.device_mesh import init_device_mesh

from automodel.parallel.context import (
    causal_lm_buffers,
    context_parallel,
    load_balanced_indices,
    shard_sequence,
    unshard_sequence,
)


def test_load_balanced_layout_balances_causal_work() -> None:
    assert load_balanced_indices(8, 2).tolist() == [[0, 1, 6, 7], [2, 3, 4, 5]]
    assert load_balanced_indices(8, 2, load_balance=False).tolist() == [[0, 1, 2, 3], [4, 5, 6, 7]]
    for cp in (2, 3, 4):
        seq = 2 * cp * 5
        index = load_balanced_indices(seq, cp)
        assert sorted(index.reshape(-1).tolist()) == list(range(seq))
        # causal work of a query at position p is p + 1 keys: equal on every rank
        work = (index + 1).sum(dim=1)
        assert torch.all(work == work[0]), work
        contiguous = (load_balanced_indices(seq, cp, load_balance=False) + 1).sum(dim=1)
        assert contiguous[-1] > contiguous[0]  # what the head-tail layout avoids


def test_shard_and_unshard_are_inverse() -> None:
    full = torch.randn(2, 24, 3)
    for cp in (2, 3):
        for balance in (True, False):
            shards = [shard_sequence(full, r, cp, load_balance=balance) for r in range(cp)]
            assert all(s.shape == (2, 24 // cp, 3) for s in shards)
            assert torch.equal(unshard_sequence(shards, load_balance=balance), full)
    positions = torch.arange(12)[None]
    assert shard_sequence(positions, 0, 3, seq_dim=1).tolist() == [[0, 1, 10, 11]]


def test_causal_lm_buffers_shift_before_sharding() -> None:
    ids = torch.tensor([[10, 11, 12, 13, 14, 15, 16, 17]])
    labels = ids.clone()
    labels[0, 2] = -100
    buffers, count = causal_lm_buffers(ids, labels)
    assert count == 6  # 7 shifted targets, one of them ignored
    assert buffers["shift_labels"].tolist() == [[11, -100, 13, 14, 15, 16, 17, -100]]
    # rank 0 of cp=2 keeps positions 0, 1, 6, 7: each keeps its own next-token target
    local = shard_sequence(buffers["shift_labels"], 0, 2)
    assert local.tolist() == [[11, -100, 17, -100]]
    assert shard_sequence(buffers["position_ids"], 0, 2).tolist() == [[0, 1, 6, 7]]


def test_bad_sequence_length_raises_value_error() -> None:
    with pytest.raises(
        ValueError, match=r"multiple of 4 \(2 \* cp, load-balanced\).*pad sequences"
    ):
        load_balanced_indices(10, 2)


def _cm_shards_like_shard_sequence(rank: int, world_size: int) -> list[list[int]]:
    """Enters context_parallel on gloo (no attention call): the buffers' shards and restore."""
    mesh = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    ids = torch.arange(16).view(1, 16) + 100
    buffers, _ = causal_lm_buffers(ids, ids)
    tensors = list(buffers.values())
    originals = [t.clone() for t in tensors]
    seen = []
    with context_parallel(mesh, buffers=tensors, no_restore={tensors[2]}):
        for t, full in zip(tensors, originals):
            assert torch.equal(t, shard_sequence(full, rank, world_size)), (rank, t, full)
        seen = tensors[1].tolist()
    assert torch.equal(tensors[0], originals[0]) and torch.equal(tensors[1], originals[1])
    assert tensors[2].shape[1] == 16 // world_size  # not restored
    try:
        with context_parallel(mesh, buffers=[torch.zeros(1, 6)]):
            pass
    except ValueError as err:
        assert "multiple of 4" in str(err)
    else:
        raise AssertionError("a sequence of 6 on cp=2 must raise")
    return seen


# Runs inside the 2-rank launch of test_parallelize.test_automatic_plan_every_decoder_architecture
# (a launch costs each rank seconds of imports); these are the shards each rank must see.
CM_SHARDS_ON_2_RANKS = [[[0, 1, 2, 3, 12, 13, 14, 15]], [[4, 5, 6, 7, 8, 9, 10, 11]]]


# ----------------------------------------------------------------------------------------------
# GPU: loss and gradients of a Llama-shaped model at seq 8192, cp ranks vs the full sequence.


def _cp_worker(rank: int, world_size: int, seq: int = 8192) -> dict[str, float]:
    """Returns the cp loss, the full-sequence loss and the worst relative gradient error (bf16)."""
    import transformers

    device = init_nccl()
    mesh = init_device_mesh(device, (world_size,), mesh_dim_names=("cp",))
    config = transformers.LlamaConfig(
        vocab_size=1024,
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=16384,
        attn_implementation="sdpa",
        use_cache=False,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(device, torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1024, (1, seq), generator=gen).to(device)
    labels = ids.clone()
    labels[0, :100] = -100

    ref = model(ids, labels=labels).loss
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))

    buffers, n_tokens = causal_lm_buffers(ids, labels)
    with context_parallel(mesh, buffers=list(buffers.values())):
        local = buffers["input_ids"]
        assert local.shape[1] == seq // world_size
        logits = model(
            input_ids=local,
            position_ids=buffers["position_ids"],
            attention_mask=torch.ones_like(local),
        ).logits
        loss = (
            F.cross_entropy(
                logits.flatten(0, 1).float(),
                buffers["shift_labels"].flatten(),
                ignore_index=-100,
                reduction="sum",
            )
            / n_tokens
        )
        grads = torch.autograd.grad(loss, list(model.parameters()))
    loss = loss.detach()
    dist.all_reduce(loss)  # each rank's share of the global token mean
    worst_grad = 0.0
    for g, r in zip(grads, ref_grads, strict=True):
        g = g.float()
        dist.all_reduce(g)
        worst_grad = max(
            worst_grad, float((g - r.float()).norm() / r.float().norm().clamp_min(1e-12))
        )
    dist.barrier()
    dist.destroy_process_group()
    return {"loss": float(loss), "ref": float(ref), "worst_grad_rel": worst_grad}


@pytest.mark.gpu
@pytest.mark.slow
def test_context_parallel_loss_matches_cp1_at_seq_8k() -> None:
    results = run_nccl(_cp_worker, gpu_world(), timeout=120)
    result = results[0]
    assert abs(result["loss"] - result["ref"]) <= 2e-2 * abs(result["ref"]), result
    assert result["worst_grad_rel"] <= 5e-2, result
