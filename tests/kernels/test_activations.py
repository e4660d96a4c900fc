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
