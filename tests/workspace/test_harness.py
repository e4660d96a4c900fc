"""The harness itself: tiny checkpoints load in transformers, the multi-rank runner reports failures."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import transformers

from harness import TINY_MODELS, run_distributed, tiny_config


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_tiny_checkpoint_loads_and_runs(name, tiny_model_dir):
    path = tiny_model_dir(name)
    model = getattr(transformers, TINY_MODELS[name][1]).from_pretrained(path)
    tok = transformers.AutoTokenizer.from_pretrained(path)
    ids = torch.tensor([tok("the quick brown fox jumps")["input_ids"]])
    kwargs = {}
    if name == "llava":
        ids = torch.cat([torch.full((1, 16), model.config.image_token_index), ids], dim=1)
        kwargs["pixel_values"] = torch.randn(1, 3, 32, 32)
    labels = torch.tensor([1]) if name == "bert" else ids
    out = model(input_ids=ids, labels=labels, **kwargs)
    assert torch.isfinite(out.loss)
    assert out.loss.item() > 0


def test_harness_has_gqa_and_odd_head_dim():
    cfg = tiny_config("llama")
    assert cfg.num_key_value_heads < cfg.num_attention_heads
    assert cfg.head_dim != cfg.hidden_size // cfg.num_attention_heads


def test_sharded_checkpoint_writes_index(tiny_model_dir):
    path = tiny_model_dir("llama", max_shard_size="40KB")
    assert (path / "model.safetensors.index.json").exists()
    assert len(list(path.glob("model-*-of-*.safetensors"))) > 1


def test_chat_template_marks_assistant_tokens(tokenizer_dir):
    tok = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "hi there"}]
    out = tok.apply_chat_template(
        msgs, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
    )
    mask = out["assistant_masks"]
    assert 0 < sum(mask) < len(mask)
    assistant_ids = [i for i, m in zip(out["input_ids"], mask, strict=True) if m]
    assert tok.decode(assistant_ids) == "hi there<|im_end|>"


def _allreduce_worker(rank: int, world_size: int, scale: float) -> float:
    t = torch.tensor([float(rank + 1) * scale])
    dist.all_reduce(t)
    return float(t)


def _failing_worker(rank: int, world_size: int) -> None:
    if rank == 1:
        raise RuntimeError("planted failure on rank 1")
    dist.barrier()  # rank 0 would hang here forever: the runner must kill it


def test_run_distributed_returns_results_by_rank():
    assert run_distributed(_allreduce_worker, world_size=3, scale=2.0) == [12.0, 12.0, 12.0]


def test_run_distributed_reports_every_rank_log_on_failure():
    with pytest.raises(AssertionError) as info:
        run_distributed(_failing_worker, world_size=2, timeout=60)
    text = str(info.value)
    assert "planted failure on rank 1" in text
    assert "----- rank 0" in text and "----- rank 1" in text
