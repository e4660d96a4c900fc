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

    # packed sequences through the kernels' document masking: the default backend (FlexAttention
    # on CUDA when a block mask is needed) and the one a user picks per model if flex fails
    fallback = "eager" if name == "gemma2" else "sdpa"  # SDPA has no softcap
    picked = AutoModelForCausalLM.from_pretrained(path, kernels={"attention": fallback}, **kwargs)
    pos = torch.cat([torch.arange(50), torch.arange(78)]).unsqueeze(0).cuda()
    for model in (picked, ours):
        with torch.no_grad():
            packed = model(ids[:1], position_ids=pos).logits
            alone = model(ids[:1, 50:]).logits
        assert _cosine(packed[:, 50:], alone) > 0.999, model is ours

    # greedy decoding with the KV cache agrees with transformers on the first tokens
    with torch.no_grad():
        got = ours.generate(ids[:2, :16], max_new_tokens=4, do_sample=False, pad_token_id=0)
        want = ref.generate(ids[:2, :16], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(got[:, :17], want[:, :17])


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("name", "batch"), [("llama", "padded"), ("llama", "packed"), ("qwen3_moe", "plain")]
)
def test_training_step_makes_no_host_device_sync(name: str, batch: str, tiny_model_dir) -> None:
    """Forward and backward never wait on the GPU (no .item(), nonzero, D2H copy) once warmed up.

    llama runs automodel's own decoder; qwen3_moe a patched transformers model (grouped experts,
    and no packed-sequence check when the model makes its own positions)."""
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir(name), dtype=torch.bfloat16, device_map="cuda"
    )
    model.train()
    model.logits_with_loss = False
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 384, (2, 128), generator=gen).cuda()
    if batch == "padded":
        mask = torch.ones_like(ids)
        mask[1, 100:] = 0
        inputs = {"attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    elif batch == "packed":
        pos = torch.cat([torch.arange(50), torch.arange(78)]).expand(2, -1).cuda()
        inputs = {"position_ids": pos, "labels": ids}
    else:
        inputs = {"labels": ids, "use_cache": False}
    for step in range(2):  # the first step may autotune / compile, which synchronizes
        if step == 1:
            torch.cuda.set_sync_debug_mode("error")
        try:
            model(ids, **inputs).loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_qlora_through_from_pretrained(tiny_model_dir, tmp_path) -> None:
    """peft={..., "quantize_base": "nf4"}: 4-bit base, bf16 adapters train, save and reload."""
    bnb = pytest.importorskip("bitsandbytes")
    from automodel.core.peft import adapter_modules, load_adapter

    path = tiny_model_dir("llama")
    qlora = {"rank": 8, "alpha": 16, "quantize_base": "nf4"}
    kwargs = dict(dtype=torch.bfloat16, device_map="cuda", peft=qlora)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    assert type(model).__module__.startswith("automodel.core.models.")
    for lora in adapter_modules(model).values():
        assert isinstance(lora.weight, bnb.nn.Params4bit) and not lora.weight.requires_grad
    trainable = [p for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.bfloat16 for p in trainable)
    ids = torch.randint(5, 384, (2, 64), generator=torch.Generator().manual_seed(0)).cuda()
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    losses = []
    for _ in range(3):
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0]
    model.eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "adapter_model.safetensors").is_file()
    fresh = load_adapter(AutoModelForCausalLM.from_pretrained(path, **kwargs), tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(fresh(ids).logits, model(ids).logits, atol=1e-2, rtol=1e-2)
