"""The experts' gated activation on the packed output of their gate/up grouped GEMM."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from automodel.kernels._backend import resolve_backend


def swiglu_packed(gate_up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Returns ``[N, I]``: ``silu(gate) * up`` for ``gate, up = gate_up.chunk(2, dim=-1)``.

    The layout of transformers' fused experts (``gate_up_proj`` ``[E, 2I, H]``: gate rows first),
    so the first grouped GEMM's ``[N, 2I]`` output goes in as it is. ``backend``: ``"auto"`` (one
    Triton pass each way on CUDA: no half copies forward, no ``cat`` backward), ``"torch"`` or
    ``"triton"``. Same dtype as ``gate_up``.

    Example:
        >>> gate_up = torch.randn(3, 8)
        >>> torch.equal(swiglu_packed(gate_up), F.silu(gate_up[:, :4]) * gate_up[:, 4:])
        True
    """
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(
            f"swiglu_packed: expected gate_up [N, 2I] with an even last dimension, got "
            f"{tuple(gate_up.shape)}; pass the gate/up GEMM output before chunking it"
        )
    if resolve_backend("swiglu_packed", backend, gate_up.device) == "triton":
        from automodel.kernels.moe._triton_gated import swiglu_packed_triton

        return swiglu_packed_triton(gate_up)
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
