"""rope_init / rope_cos_sin / apply_rotary against transformers' rotary embeddings, every rope_type."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import LlamaConfig, Phi3Config
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
from transformers.models.phi3.modeling_phi3 import Phi3RotaryEmbedding
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_apply_rotary

from automodel.kernels import apply_rotary, rope_cos_sin, rope_init

HEAD_DIM = 64
MAX_POS = 256

ROPE_PARAMETERS: dict[str, dict[str, Any]] = {
    "default": {"rope_type": "default", "rope_theta": 10000.0},
    "linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0},
    "llama3": {
        "rope_type": "llama3",
        "rope_theta": 500000.0,
        "factor": 32.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    },
    "yarn": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 32.0,
        "beta_slow": 1.0,
    },
    "yarn_mscale": {
        "rope_type": "yarn",
        "rope_theta": 10000.0,
        "factor": 40.0,
        "original_max_position_embeddings": 64,
        "mscale": 1.0,
        "mscale_all_dim": 0.707,
        "truncate": False,
    },
    "longrope": {
        "rope_type": "longrope",
        "rope_theta": 10000.0,
        "original_max_position_embeddings": 64,
        "short_factor": [1.0 + 0.05 * i for i in range(HEAD_DIM // 2)],
        "long_factor": [2.0 + 0.25 * i for i in range(HEAD_DIM // 2)],
    },
}


def _llama_rotary(parameters: dict[str, Any]) -> LlamaRotaryEmbedding:
    config = LlamaConfig(
        hidden_size=HEAD_DIM * 4,
        num_attention_heads=4,
        head_dim=HEAD_DIM,
        max_position_embeddings=MAX_POS,
        rope_parameters=dict(parameters),
    )
    return LlamaRotaryEmbedding(config)


@pytest.mark.parametrize("name", list(ROPE_PARAMETERS))
def test_rope_tables_match_transformers_bitwise(name: str) -> None:
    parameters = ROPE_PARAMETERS[name]
    hf = _llama_rotary(parameters)
    # Short sequences, and for the length-dependent types one beyond the trained length too.
    lengths = [48, MAX_POS + 64] if parameters["rope_type"] in ("dynamic", "longrope") else [48]
    for seq_len in lengths:
        position_ids = torch.arange(seq_len)[None].expand(2, -1)
        x = torch.zeros(2, seq_len, HEAD_DIM)
        hf_cos, hf_sin = hf(x, position_ids)
        # transformers' forward-time update passes the length as a tensor: position_ids.max() + 1.
        inv_freq, scaling = rope_init(
            parameters, HEAD_DIM, max_position_embeddings=MAX_POS, seq_len=position_ids.max() + 1
        )
        assert torch.equal(inv_freq, hf.inv_freq), (name, seq_len)
        assert scaling == hf.attention_scaling
        cos, sin = rope_cos_sin(inv_freq, position_ids, attention_scaling=scaling)
        assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin), (name, seq_len)


def test_rope_init_default_equals_the_model_default_init() -> None:
    hf = _llama_rotary(ROPE_PARAMETERS["default"])
    inv_freq, scaling = rope_init(ROPE_PARAMETERS["default"], HEAD_DIM)
    ref, ref_scaling = hf.compute_default_rope_parameters(hf.config)
    assert torch.equal(inv_freq, ref) and scaling == ref_scaling


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rotary_matches_apply_rotary_pos_emb(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    inv_freq, scaling = rope_init(ROPE_PARAMETERS["llama3"], HEAD_DIM)
    position_ids = torch.randint(0, 200, (2, 12))
    cos, sin = rope_cos_sin(inv_freq, position_ids, attention_scaling=scaling, dtype=dtype)
    q = torch.randn(2, 8, 12, HEAD_DIM, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 2, 12, HEAD_DIM, dtype=dtype, requires_grad=True)
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
    out_q, out_k = apply_rotary(q, k, cos, sin, backend="torch")
    assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)
    gq, gk = torch.randn_like(ref_q), torch.randn_like(ref_k)
    ref_grads = torch.autograd.grad((ref_q, ref_k), (q, k), (gq, gk))
    out_grads = torch.autograd.grad((out_q, out_k), (q, k), (gq, gk))
    assert all(torch.equal(a, b) for a, b in zip(out_grads, ref_grads))


def test_partial_rotary_matches_phi3() -> None:
    torch.manual_seed(0)
    parameters = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    config = Phi3Config(
        hidden_size=HEAD_DIM * 4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=MAX_POS,
        rope_parameters=dict(parameters),
        pad_token_id=0,
    )
    hf = Phi3RotaryEmbedding(config)
    position_ids = torch.arange(10)[None]
    hf_cos, hf_sin = hf(torch.zeros(1, 10, HEAD_DIM), position_ids)
    inv_freq, scaling = rope_init(parameters, HEAD_DIM)
    assert inv_freq.shape == (HEAD_DIM // 4,)
    cos, sin = rope_cos_sin(inv_freq, position_ids, attention_scaling=scaling)
    assert torch.equal(cos, hf_cos) and torch.equal(sin, hf_sin)
    # The kwarg form gives the same tables when rope_parameters has no factor.
    kwarg_inv_freq, _ = rope_init({"rope_theta": 10000.0}, HEAD_DIM, partial_rotary_factor=0.5)
    assert torch.equal(kwarg_inv_freq, inv_freq)
    q, k = torch.randn(1, 4, 10, HEAD_DIM), torch.randn(1, 2, 10, HEAD_DIM)
    ref_q, ref_k = phi3_apply_rotary(q, k, cos, sin)
    out_q, out_k = apply_rotary(q, k, cos, sin, backend="torch")
    assert torch.equal(out_q, ref_q) and torch.equal(out_k, ref_k)
    assert torch.equal(out_q[..., HEAD_DIM // 2 :], q[..., HEAD_DIM // 2 :])


def test_rope_rejects_bad_inputs() -> None:
    with pytest.raises(ValueError, match="'ntk' is not supported"):
        rope_init({"rope_type": "ntk", "rope_theta": 1.0}, 8)
    with pytest.raises(ValueError, match="needs rope_parameters\\['factor'\\]"):
        rope_init({"rope_type": "linear", "rope_theta": 1e4}, 8)
    with pytest.raises(ValueError, match="needs max_position_embeddings"):
        rope_init({"rope_type": "dynamic", "rope_theta": 1e4, "factor": 2.0}, 8)
    cos = torch.ones(1, 4, 8)
    with pytest.raises(ValueError, match="apply_rotary: expected q"):
        apply_rotary(torch.randn(1, 2, 4, 4), torch.randn(1, 2, 4, 4), cos, cos)


def _triton_rope_worker(rank: int, world_size: int) -> list:
    """Both backends on the same inputs, in a TRITON_INTERPRET=1 process."""
    pairs = []
    for partial in (1.0, 0.5):
        torch.manual_seed(4)
        inv_freq, scaling = rope_init(ROPE_PARAMETERS["yarn"], 16, partial_rotary_factor=partial)
        position_ids = torch.randint(0, 300, (2, 5))
        cos, sin = rope_cos_sin(inv_freq, position_ids, attention_scaling=scaling)
        # q in the [B, S, H, D] storage HF attention produces, viewed as [B, H, S, D]; 3 heads
        # (not a power of two) for q, 1 for k; cos/sin also broadcast from batch 1.
        q = torch.randn(2, 5, 3, 16).transpose(1, 2).requires_grad_(True)
        k = torch.randn(2, 1, 5, 16).requires_grad_(True)
        upstream = (torch.randn(2, 3, 5, 16), torch.randn(2, 1, 5, 16))
        for tag, tables in (("", (cos, sin)), (" batch-1 tables", (cos[:1], sin[:1]))):
            ref = apply_rotary(q, k, *tables, backend="torch")
            out = apply_rotary(q, k, *tables, backend="triton")
            ref_grads = torch.autograd.grad(ref, (q, k), upstream)
            grads = torch.autograd.grad(out, (q, k), upstream)
            names = ("q", "k", "dq", "dk")
            for name, got, want in zip(names, out + grads, ref + ref_grads):
                pairs.append((f"partial={partial}{tag} {name}", got.detach(), want.detach()))
    return pairs


@pytest.mark.slow
def test_triton_apply_rotary_matches_reference(triton_pairs, assert_pairs_close) -> None:
    assert_pairs_close(triton_pairs, rtol=1e-6, atol=1e-6)


@pytest.mark.gpu
# 0: the default (8 warps at 32 x 128 heads); 4 and 8: the geometries kernels_bench.py sweeps.
@pytest.mark.parametrize("num_warps", [0, 4])
def test_gpu_triton_apply_rotary_bf16(assert_rel_close, num_warps: int, monkeypatch) -> None:
    from automodel.kernels._triton.rope import TUNING

    monkeypatch.setitem(TUNING, "num_warps", num_warps)
    batch, seq, n_q, n_k, head_dim = 2, 4096, 32, 8, 128
    inv_freq, scaling = rope_init(ROPE_PARAMETERS["llama3"], head_dim, device="cuda")
    position_ids = torch.arange(seq, device="cuda")[None].expand(batch, -1)
    cos, sin = rope_cos_sin(inv_freq, position_ids, attention_scaling=scaling)
    q = torch.randn(batch, seq, n_q, head_dim, device="cuda").transpose(1, 2)
    k = torch.randn(batch, seq, n_k, head_dim, device="cuda").transpose(1, 2)
    dq, dk = torch.randn_like(q), torch.randn_like(k)
    q32, k32 = q.clone().requires_grad_(True), k.clone().requires_grad_(True)
    ref = apply_rotary(q32, k32, cos, sin, backend="torch")
    ref_grads = torch.autograd.grad(ref, (q32, k32), (dq, dk))
    q16, k16 = q.bfloat16().requires_grad_(True), k.bfloat16().requires_grad_(True)
    out = apply_rotary(q16, k16, cos.bfloat16(), sin.bfloat16())
    grads = torch.autograd.grad(out, (q16, k16), (dq.bfloat16(), dk.bfloat16()))
    for name, got, want in zip(("q", "k", "dq", "dk"), out + grads, ref + ref_grads):
        assert_rel_close(got, want, 1e-2, name)
    out32 = apply_rotary(q, k, cos, sin, backend="triton")
    for got, want in zip(out32, ref):
        assert_rel_close(got, want, 1e-5, "fp32")
