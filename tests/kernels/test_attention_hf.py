"""hf_attention_forward against transformers' own attention functions, on real tiny models."""

from __future__ import annotations

import functools

import pytest
import torch

from automodel.kernels.attention import attention, hf_attention_forward
from harness.models import tiny_config

NAME = "automodel_kernels_test"


def _model(name: str, attn_implementation: str) -> torch.nn.Module:
    from transformers import AttentionInterface, AutoModelForCausalLM
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask

    # What automodel-core does: our function, with transformers' [B, Sk] padding-mask builder.
    AttentionInterface.register(NAME, hf_attention_forward)
    AttentionMaskInterface.register(NAME, flash_attention_mask)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(
        tiny_config(name), attn_implementation=attn_implementation
    )
    return model.eval()


@pytest.mark.slow
def test_matches_sdpa_attention_forward_on_a_llama_attention_module() -> None:
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    module = _model("llama", "sdpa").model.layers[0].self_attn
    torch.manual_seed(1)
    batch, seq, dim = 2, 10, module.head_dim
    heads, kv_heads = 4, 2
    q = torch.randn(batch, heads, seq, dim)
    k, v = torch.randn(batch, kv_heads, seq, dim), torch.randn(batch, kv_heads, seq, dim)
    padding = torch.ones(batch, seq, dtype=torch.bool)
    padding[1, :3] = False
    causal = torch.tril(torch.ones(seq, seq, dtype=torch.bool))
    mask4d = causal[None, None] & padding[:, None, None, :]
    additive = torch.zeros(mask4d.shape).masked_fill(~mask4d, torch.finfo(torch.float32).min)
    for mask in (None, mask4d, additive):
        want, _ = sdpa_attention_forward(module, q, k, v, mask, scaling=module.scaling)
        got, none = hf_attention_forward(module, q, k, v, mask, scaling=module.scaling)
        assert none is None and got.shape == (batch, seq, heads, dim)
        real = (
            mask4d.any(-1)[:, 0] if mask is not None else torch.ones(batch, seq, dtype=torch.bool)
        )
        torch.testing.assert_close(got[real], want[real], atol=1e-6, rtol=1e-6)
    # The raw [B, Sk] padding mask transformers passes to attention functions it builds no mask for.
    want, _ = sdpa_attention_forward(module, q, k, v, mask4d, scaling=module.scaling)
    got, _ = hf_attention_forward(module, q, k, v, padding.long(), scaling=module.scaling)
    real = mask4d.any(-1)[:, 0]
    torch.testing.assert_close(got[real], want[real], atol=1e-6, rtol=1e-6)
    # Decoding: one query over the whole cache.
    want, _ = sdpa_attention_forward(module, q[:, :, -1:], k, v, None, scaling=module.scaling)
    got, _ = hf_attention_forward(module, q[:, :, -1:], k, v, None, scaling=module.scaling)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="dropout"):
        hf_attention_forward(module, q, k, v, None, dropout=0.1)


@pytest.mark.slow
def test_registered_in_transformers_gives_the_same_logits_and_generations() -> None:
    torch.manual_seed(2)
    ids = torch.randint(5, 300, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    # mistral and gemma2 have a 16-token sliding window (< 24); gemma2 softcaps its attention logits,
    # which transformers' sdpa refuses, so its reference is eager.
    for name, reference in [
        ("llama", "sdpa"),
        ("mistral", "sdpa"),
        ("gemma2", "eager"),
        ("qwen3_moe", "sdpa"),
    ]:
        ours, theirs = _model(name, NAME), _model(name, reference)
        with torch.no_grad():
            got = ours(input_ids=ids, attention_mask=mask).logits
            want = theirs(input_ids=ids, attention_mask=mask).logits
        real = mask.bool()
        torch.testing.assert_close(got[real], want[real], atol=2e-5, rtol=2e-5, msg=name)
        # Packed sequences: position_ids restart per document and document_ids reach attention.
        if name == "llama":
            with torch.no_grad():
                packed = ours(
                    input_ids=ids[:1],
                    position_ids=torch.cat([torch.arange(10), torch.arange(14)]).unsqueeze(0),
                    document_ids=torch.tensor([[0] * 10 + [1] * 14]),
                ).logits
                second = theirs(input_ids=ids[:1, 10:]).logits
            torch.testing.assert_close(packed[0, 10:], second[0], atol=2e-5, rtol=2e-5)
            gen = functools.partial(
                ours.generate, max_new_tokens=4, do_sample=False, pad_token_id=0
            )
            with torch.no_grad():
                assert torch.equal(
                    gen(input_ids=ids, attention_mask=mask),
                    theirs.generate(
                        input_ids=ids,
                        attention_mask=mask,
                        max_new_tokens=4,
                        do_sample=False,
                        pad_token_id=0,
                    ),
                )


@pytest.mark.slow
def test_traces_into_one_graph_under_torch_compile() -> None:
    # Core compiles decoder blocks: the attention call must not break the graph (dynamo only here;
    # inductor code generation is the GPU suite's business).
    module = torch.nn.Module()
    module.is_causal = True  # type: ignore[assignment]
    torch.manual_seed(0)
    q, k = torch.randn(2, 4, 12, 8), torch.randn(2, 2, 12, 8)
    padding = torch.ones(2, 12, dtype=torch.long)
    padding[1, :3] = 0
    docs = torch.tensor([[0] * 5 + [1] * 7] * 2)

    def step(q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = hf_attention_forward(module, q, k, k, padding, sliding_window=5)[0]
        return a, attention(q, k, k, document_ids=docs)

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    for got, want in zip(compiled(q, k), step(q, k)):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


@pytest.mark.gpu
def test_gpu_registered_model_trains_like_transformers_in_bf16() -> None:
    # Left padding under a causal mask leaves queries that see no key. transformers' sdpa hands
    # those rows to whichever SDPA kernel torch picks, and cuDNN's gives NaN gradients there (torch
    # 2.11, H200), so the bf16 reference is transformers' eager attention, defined on every row.
    # Both are measured against fp32 eager: ours must be about as close as transformers' own bf16.
    ids = torch.randint(5, 300, (2, 64), device="cuda")
    mask = torch.ones(2, 64, dtype=torch.long, device="cuda")
    mask[1, :7] = 0
    losses, grads = {}, {}
    for impl, dtype in (
        (NAME, torch.bfloat16),
        ("eager", torch.bfloat16),
        ("eager", torch.float32),
    ):
        model = _model("mistral", impl).to("cuda", dtype).train()
        out = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
        out.loss.backward()
        losses[impl, dtype] = out.loss.float()
        grads[impl, dtype] = model.model.layers[0].self_attn.q_proj.weight.grad.float()
    ref_loss, ref_grad = losses["eager", torch.float32], grads["eager", torch.float32]
    errors = {
        impl: float((grads[impl, torch.bfloat16] - ref_grad).norm() / ref_grad.norm())
        for impl in (NAME, "eager")
    }
    for impl in (NAME, "eager"):
        assert torch.isfinite(grads[impl, torch.bfloat16]).all(), impl
        assert abs(float(losses[impl, torch.bfloat16] - ref_loss)) < 1e-2 * float(ref_loss), impl
    # Layer 0's q_proj gradient cancels a lot: bf16 alone moves it by about 10% (H200 run).
    assert errors[NAME] < max(0.15, 1.5 * errors["eager"]), errors
