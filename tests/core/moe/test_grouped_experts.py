"""Grouped-GEMM experts equal transformers' per-expert loop: logits, aux loss, gradients, generate."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers

from automodel.core.moe import moe_load_stats, patch_moe_experts
from harness import MOE_MODELS, build_tiny_model


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, 384, (2, 20), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second row
    return ids, mask


@pytest.mark.parametrize("name", MOE_MODELS)
def test_logits_aux_loss_and_grads_match_transformers(name):
    ref = build_tiny_model(name)
    ref.config.output_router_logits = True
    ours = copy.deepcopy(ref)
    patched = patch_moe_experts(ours)
    assert len(patched) == ref.config.num_hidden_layers
    assert patch_moe_experts(ours) == patched  # idempotent

    ids, mask = _batch()
    ref_out = ref(input_ids=ids, attention_mask=mask, labels=ids)
    our_out = ours(input_ids=ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(our_out.logits, ref_out.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(our_out.aux_loss, ref_out.aux_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(our_out.loss, ref_out.loss, atol=1e-6, rtol=1e-6)

    ref_out.loss.backward()
    our_out.loss.backward()
    ref_grads = dict(ref.named_parameters())
    for pname, param in ours.named_parameters():
        expected = ref_grads[pname].grad
        assert param.grad is not None, pname
        torch.testing.assert_close(param.grad, expected, atol=1e-6, rtol=1e-5, msg=pname)


@pytest.mark.parametrize("name", MOE_MODELS)
def test_generate_gives_identical_tokens(name):
    ref = build_tiny_model(name)
    ours = copy.deepcopy(ref)
    patch_moe_experts(ours)
    ids, _ = _batch(1)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(ours.generate(ids[:1], **kwargs), ref.generate(ids[:1], **kwargs))


def test_load_stats_count_every_routed_token():
    model = build_tiny_model("qwen3_moe")
    assert moe_load_stats(model) is None
    patch_moe_experts(model)
    ids, _ = _batch()
    with torch.no_grad():
        model(input_ids=ids)
    stats = moe_load_stats(model)
    assert stats is not None
    cfg = model.config
    assert stats.tokens_per_expert.shape == (cfg.num_hidden_layers, cfg.num_experts)
    # every token is routed to top_k experts in every layer
    assert torch.all(stats.tokens_per_expert.sum(dim=1) == ids.numel() * cfg.num_experts_per_tok)
    metrics = stats.to_metrics()
    assert metrics["moe/imbalance_max"] >= metrics["moe/imbalance_mean"] >= 1.0


def test_dense_models_are_left_alone():
    model = build_tiny_model("llama")
    assert patch_moe_experts(model) == []
    assert isinstance(model, transformers.PreTrainedModel)
