"""Architectures without an optimized implementation load through transformers, kernel-patched,
with transformers' outputs; kernels="none"/force_hf give the stock classes."""

from __future__ import annotations

import pytest
import torch
import transformers

import automodel.core as ac
from automodel.core import (
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoModelForSequenceClassification,
)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["phi3", "mixtral", "qwen3_moe"])
def test_fallback_decoder_is_patched_and_matches(name: str, tiny_model_dir) -> None:
    path = tiny_model_dir(name)
    ours = AutoModelForCausalLM.from_pretrained(path)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path)
    assert type(ours) is type(ref)  # a stock transformers class
    report = ours._automodel_patches
    assert any("RMSNorm" in n for n in report.modules), report
    assert "loss_function" in report.functions
    if name == "phi3":
        assert report.modules["Phi3MLP"] == ref.config.num_hidden_layers  # fused gate_up MLP
    ids = torch.randint(5, 384, (2, 20), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 14:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    out = ours(ids, attention_mask=mask, labels=labels)
    exp = ref(ids, attention_mask=mask, labels=labels)
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], exp.logits[real], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, exp.loss, rtol=1e-5, atol=0)
    out.loss.backward()
    assert all(p.grad is not None for p in ours.parameters() if p.requires_grad)


@pytest.mark.slow
def test_vlm_forward_backward(tiny_model_dir) -> None:
    path = tiny_model_dir("llava")
    model = AutoModelForImageTextToText.from_pretrained(path)
    assert isinstance(model, transformers.LlavaForConditionalGeneration)
    ids = torch.randint(6, 384, (2, 24), generator=torch.Generator().manual_seed(0))
    ids[:, 2:18] = 5  # 16 image tokens per sample
    pixels = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    out = model(input_ids=ids, pixel_values=pixels, labels=ids)
    ref = transformers.AutoModelForImageTextToText.from_pretrained(path)
    exp = ref(input_ids=ids, pixel_values=pixels, labels=ids)
    torch.testing.assert_close(out.logits, exp.logits, atol=1e-5, rtol=0)
    out.loss.backward()
    patch = [p.grad for n, p in model.named_parameters() if "patch_embedding" in n]
    assert len(patch) == 1 and patch[0] is not None and patch[0].abs().sum() > 0  # reaches pixels


@pytest.mark.slow
def test_classifier_and_opt_outs(tiny_model_dir) -> None:
    bert = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir("bert"))
    assert isinstance(bert, transformers.BertForSequenceClassification)
    ids = torch.randint(5, 384, (2, 10))
    out = bert(ids, labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and torch.isfinite(out.loss)

    llama = tiny_model_dir("llama")
    stock = AutoModelForCausalLM.from_pretrained(llama, kernels="none")
    assert type(stock) is transformers.LlamaForCausalLM and not hasattr(stock, "_automodel_patches")
    forced = AutoModelForCausalLM.from_pretrained(llama, force_hf=True)
    assert type(forced) is transformers.LlamaForCausalLM and forced._automodel_patches.modules
    base = ac.AutoModel.from_pretrained(llama)
    assert type(base).__name__ == "LlamaModel" and type(base).__module__.startswith("automodel.")
    # other Auto classes come through the fallback
    token_cls = ac.AutoModelForTokenClassification.from_pretrained(tiny_model_dir("bert"))
    assert isinstance(token_cls, transformers.BertForTokenClassification)
    with pytest.raises(ValueError, match="kernels="):
        AutoModelForCausalLM.from_pretrained(llama, kernels="fast")
    # from_config: optimized class, random init, dtype honoured
    cfg = transformers.AutoConfig.from_pretrained(llama)
    fresh = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
    assert type(fresh).__module__.startswith("automodel.") and fresh.dtype == torch.bfloat16
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight  # tied as configured
