"""Optimized families versus transformers' own classes (fp32, CPU): logits, loss, every gradient,
padded batches, packed sequences, greedy generation, and save_pretrained round trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers

from automodel.core import AutoModelForCausalLM
from harness.models import DENSE_DECODER_MODELS

ATOL = 1e-5
RTOL = 1e-5


def _load_pair(path: Path):
    ours = AutoModelForCausalLM.from_pretrained(path)
    assert type(ours).__module__.startswith("automodel.core.models."), type(ours)
    assert isinstance(ours, transformers.PreTrainedModel)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager")
    return ours, ref


def _assert_grads_match(ours: torch.nn.Module, ref: torch.nn.Module) -> None:
    ref_grads = {n: p.grad for n, p in ref.named_parameters()}
    for name, p in ours.named_parameters():
        g_ref = ref_grads[name]
        assert p.grad is not None and g_ref is not None, name
        scale = g_ref.abs().max().item()
        err = (p.grad - g_ref).abs().max().item()
        assert err <= RTOL * scale + 1e-9, f"{name}: grad max err {err:.3e} vs max |g| {scale:.3e}"


def _batch(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, 384, (3, 24), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 17:] = 0  # right padding, as training batches are
    mask[2, 9:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


@pytest.mark.slow
@pytest.mark.parametrize("name", DENSE_DECODER_MODELS)
def test_family_matches_transformers(name: str, tiny_model_dir, tmp_path: Path) -> None:
    ours, ref = _load_pair(tiny_model_dir(name))

    # padded batch: logits on real tokens, loss, every parameter gradient
    ids, mask, labels = _batch()
    out = ours(ids, attention_mask=mask, labels=labels)
    exp = ref(ids, attention_mask=mask, labels=labels, use_cache=False)
    real = mask.bool()
    torch.testing.assert_close(out.logits[real], exp.logits[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(out.loss, exp.loss, rtol=RTOL, atol=0)
    out.loss.backward()
    exp.loss.backward()
    _assert_grads_match(ours, ref)
    ours.zero_grad()
    ref.zero_grad()

    # packed sequences: positions restart per document, no attention mask
    pos = torch.cat([torch.arange(10), torch.arange(6), torch.arange(8)]).unsqueeze(0)
    packed = ids[:1]
    num_items = torch.tensor(20)
    out = ours(packed, position_ids=pos, labels=packed, num_items_in_batch=num_items)
    exp = ref(
        packed, position_ids=pos, labels=packed, num_items_in_batch=num_items, use_cache=False
    )
    torch.testing.assert_close(out.logits, exp.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.loss, exp.loss, rtol=RTOL, atol=0)
    out.loss.backward()
    exp.loss.backward()
    _assert_grads_match(ours, ref)
    # documents never see each other: the last document alone gives the same logits
    alone = ours(packed[:, 16:], use_cache=False).logits
    torch.testing.assert_close(out.logits[:, 16:], alone, atol=ATOL, rtol=0)

    if name == "mistral":  # sliding window: the block-mask case
        _check_attention_backend_is_per_model(tiny_model_dir(name), ours, packed, pos)

    # greedy generation with left padding and a KV cache gives identical tokens
    prompts = torch.randint(5, 384, (2, 12), generator=torch.Generator().manual_seed(1))
    pmask = torch.ones_like(prompts)
    pmask[1, :4] = 0
    kwargs = dict(attention_mask=pmask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    with torch.no_grad():
        got = ours.generate(prompts, **kwargs)
        want = ref.generate(prompts, **kwargs)
    assert torch.equal(got, want)

    # save_pretrained writes a checkpoint plain transformers loads with identical logits
    ours.save_pretrained(tmp_path / "saved")
    back = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "saved", attn_implementation="eager"
    )
    assert type(back).__module__.startswith("transformers.")
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref(ids).logits, atol=0, rtol=0)


def _check_attention_backend_is_per_model(
    path: Path, default: torch.nn.Module, ids: torch.Tensor, pos: torch.Tensor
) -> None:
    from automodel.core.models.common.attention import Attention

    picked = AutoModelForCausalLM.from_pretrained(path, kernels={"attention": "eager"})
    assert {m.backend for m in picked.modules() if isinstance(m, Attention)} == {"eager"}
    assert {m.backend for m in default.modules() if isinstance(m, Attention)} == {"auto"}
    with torch.no_grad():
        torch.testing.assert_close(
            picked(ids, position_ids=pos).logits,
            default(ids, position_ids=pos).logits,
            atol=ATOL,
            rtol=0,
        )
    with pytest.raises(ValueError, match="attention"):
        AutoModelForCausalLM.from_pretrained(path, kernels={"attention": "flexx"})
