"""The optimized families against transformers in bf16 on CUDA (run `pytest -m gpu` on a GPU)."""

from __future__ import annotations

import pytest
import torch
import transformers

from automodel.core import AutoModelForCausalLM
from harness.models import DENSE_DECODER_MODELS


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a.flatten().float(), b.flatten().float(), 0))


@pytest.mark.gpu
@pytest.mark.parametrize("name", DENSE_DECODER_MODELS)
def test_bf16_parity_on_cuda(name: str, tiny_model_dir) -> None:
    path = tiny_model_dir(name)
    kwargs = dict(dtype=torch.bfloat16, device_map="cuda")
    ours = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    attn = "eager" if name == "gemma2" else "sdpa"  # softcapping needs eager in transformers
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation=attn, **kwargs
    )
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 384, (4, 128), generator=gen).cuda()
    mask = torch.ones_like(ids)
    mask[1, 100:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    out = ours(ids, attention_mask=mask, labels=labels)
    exp = ref(ids, attention_mask=mask, labels=labels, use_cache=False)
    real = mask.bool()
    assert _cosine(out.logits[real], exp.logits[real]) > 0.999
    torch.testing.assert_close(out.loss.float(), exp.loss.float(), rtol=1e-2, atol=0)
    out.loss.backward()
    exp.loss.backward()
    ref_grads = dict(ref.named_parameters())
    for pname, p in ours.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert _cosine(p.grad, ref_grads[pname].grad) > 0.99, pname

    # packed sequences through the kernels' document masking
    pos = torch.cat([torch.arange(50), torch.arange(78)]).unsqueeze(0).cuda()
    with torch.no_grad():
        packed = ours(ids[:1], position_ids=pos).logits
        alone = ours(ids[:1, 50:]).logits
    assert _cosine(packed[:, 50:], alone) > 0.999

    # greedy decoding with the KV cache agrees with transformers on the first tokens
    with torch.no_grad():
        got = ours.generate(ids[:2, :16], max_new_tokens=4, do_sample=False, pad_token_id=0)
        want = ref.generate(ids[:2, :16], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got[:, :17], want[:, :17])
