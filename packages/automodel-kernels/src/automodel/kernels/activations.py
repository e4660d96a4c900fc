"""Gated MLP activations fused with their product: SwiGLU (Llama, Qwen, Mistral) and GeGLU (Gemma)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from automodel.kernels._backend import resolve_backend

__all__ = ["geglu", "swiglu"]

_GELU_APPROXIMATIONS = ("tanh", "none")


def swiglu(gate: torch.Tensor, up: torch.Tensor, *, backend: str = "auto") -> torch.Tensor:
    """Returns ``silu(gate) * up``, the gated product of Llama-style MLPs.

    Equals ``ACT2FN["silu"](gate) * up`` in transformers.

    Args:
        gate: output of ``gate_proj``, ``[..., intermediate]``.
        up: output of ``up_proj``, same shape and dtype as ``gate``.
        backend: ``"auto"`` (Triton on CUDA, else PyTorch), ``"torch"`` or ``"triton"``.

    Returns:
        A tensor shaped and typed like ``gate``.

    Example:
        >>> g, u = torch.randn(4, 16), torch.randn(4, 16)
        >>> torch.equal(swiglu(g, u), torch.nn.functional.silu(g) * u)
        True
    """
    _check_pair("swiglu", gate, up)
    if resolve_backend("swiglu", backend, gate.device) == "triton":
        from automodel.kernels._triton.activations import swiglu_triton

        return swiglu_triton(gate, up)
    return F.silu(gate) * up


def geglu(
    gate: torch.Tensor, up: torch.Tensor, *, approximate: str = "tanh", backend: str = "auto"
) -> torch.Tensor:
    """Returns ``gelu(gate) * up``, the gated product of Gemma-style MLPs.

    ``approximate="tanh"`` equals ``ACT2FN["gelu_pytorch_tanh"](gate) * up`` (Gemma's
    ``hidden_activation``); ``approximate="none"`` equals ``ACT2FN["gelu"](gate) * up``.

    Args:
        gate: output of ``gate_proj``, ``[..., intermediate]``.
        up: output of ``up_proj``, same shape and dtype as ``gate``.
        approximate: ``"tanh"`` or ``"none"``, as in ``torch.nn.functional.gelu``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        A tensor shaped and typed like ``gate``.

    Example:
        >>> g, u = torch.randn(4, 16), torch.randn(4, 16)
        >>> geglu(g, u).shape
        torch.Size([4, 16])
    """
    if approximate not in _GELU_APPROXIMATIONS:
        raise ValueError(
            f"geglu: approximate={approximate!r} is not supported; expected one of "
            f"{list(_GELU_APPROXIMATIONS)} ('tanh' is gelu_pytorch_tanh, Gemma's activation)"
        )
    _check_pair("geglu", gate, up)
    if resolve_backend("geglu", backend, gate.device) == "triton":
        from automodel.kernels._triton.activations import geglu_triton

        return geglu_triton(gate, up, approximate)
    return F.gelu(gate, approximate=approximate) * up


def _check_pair(op: str, gate: torch.Tensor, up: torch.Tensor) -> None:
    if gate.shape != up.shape or gate.dtype != up.dtype:
        raise ValueError(
            f"{op}: gate and up must have the same shape and dtype; got gate {tuple(gate.shape)} "
            f"{gate.dtype} and up {tuple(up.shape)} {up.dtype}. Pass the outputs of gate_proj and "
            "up_proj (or the two halves of a fused gate_up_proj)"
        )
