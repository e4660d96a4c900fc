"""swiglu / geglu against transformers' ACT2FN products."""

from __future__ import annotations

import pytest
import torch
from transformers.activations import ACT2FN

from automodel.kernels import geglu, swiglu


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("op", "act", "kwargs"),
    [
        (swiglu, "silu", {}),
        (geglu, "gelu_pytorch_tanh", {"approximate": "tanh"}),
        (geglu, "gelu", {"approximate": "none"}),
    ],
)
def test_gated_activation_matches_act2fn(op, act: str, kwargs: dict, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    gate = (torch.randn(3, 5, 64) * 4).to(dtype).requires_grad_(True)
    up = torch.randn(3, 5, 64).to(dtype).requires_grad_(True)
    ref = ACT2FN[act](gate) * up
    grad = torch.randn_like(ref)
    ref_grads = torch.autograd.grad(ref, (gate, up), grad)
    out = op(gate, up, backend="torch", **kwargs)
    assert torch.equal(out, ref)
    assert all(
        torch.equal(a, b) for a, b in zip(torch.autograd.grad(out, (gate, up), grad), ref_grads)
    )


def test_activations_reject_bad_inputs() -> None:
    with pytest.raises(ValueError, match="same shape and dtype"):
        swiglu(torch.randn(2, 4), torch.randn(2, 5))
    with pytest.raises(ValueError, match="approximate='fast'"):
        geglu(torch.randn(2, 4), torch.randn(2, 4), approximate="fast")


def _triton_activations_worker(rank: int, world_size: int) -> list:
    """Both backends on the same inputs, in a TRITON_INTERPRET=1 process."""
    torch.manual_seed(1)
    # 1500 elements: more than one 1024-element block, with a masked tail.
    gate = (torch.randn(3, 500) * 3).requires_grad_(True)
    up = torch.randn(3, 500).requires_grad_(True)
    upstream = torch.randn(3, 500)
    pairs = []
    cases = (
        ("swiglu", swiglu, {}),
        ("geglu-tanh", geglu, {}),
        ("geglu-erf", geglu, {"approximate": "none"}),
    )
    for name, op, kwargs in cases:
        ref = op(gate, up, backend="torch", **kwargs)
        out = op(gate, up, backend="triton", **kwargs)
        ref_grads = torch.autograd.grad(ref, (gate, up), upstream)
        grads = torch.autograd.grad(out, (gate, up), upstream)
        pairs.append((name, out.detach(), ref.detach()))
        pairs += [(f"{name} d{n}", g, r) for n, g, r in zip(("gate", "up"), grads, ref_grads)]
    return pairs


@pytest.mark.slow
def test_triton_gated_activations_match_reference(triton_pairs, assert_pairs_close) -> None:
    assert_pairs_close(triton_pairs, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("op", "kwargs", "tuning"),
    [
        (swiglu, {}, {}),
        (geglu, {"approximate": "tanh"}, {}),
        # the launch geometry benchmarks/kernels_bench.py sweeps
        (swiglu, {}, {"block": 2048, "num_warps": 8}),
    ],
)
def test_gpu_triton_gated_activations_bf16(
    assert_rel_close, op, kwargs: dict, tuning: dict, monkeypatch
) -> None:
    from automodel.kernels._triton.activations import TUNING

    for key, value in tuning.items():
        monkeypatch.setitem(TUNING, key, value)
    gate = torch.randn(4, 2048, 14336, device="cuda") * 2
    up = torch.randn_like(gate)
    upstream = torch.randn_like(gate)
    g32, u32 = gate.clone().requires_grad_(True), up.clone().requires_grad_(True)
    ref = op(g32, u32, backend="torch", **kwargs)
    ref_grads = torch.autograd.grad(ref, (g32, u32), upstream)
    g16, u16 = gate.bfloat16().requires_grad_(True), up.bfloat16().requires_grad_(True)
    out = op(g16, u16, **kwargs)
    assert out.dtype == torch.bfloat16
    assert_rel_close(out, ref, 1e-2, "out")
    for name, got, want in zip(
        ("dgate", "dup"), torch.autograd.grad(out, (g16, u16), upstream.bfloat16()), ref_grads
    ):
        assert_rel_close(got, want, 1e-2, name)
    assert_rel_close(op(gate, up, backend="triton", **kwargs), ref, 1e-5, "fp32")
