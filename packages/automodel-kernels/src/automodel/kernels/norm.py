"""RMSNorm and fused residual-add + RMSNorm, bit-compatible with transformers' Llama and Gemma norms.

Two weight conventions exist in Hugging Face models, and they round differently in low precision:

* ``offset=0.0`` (Llama, Mistral, Qwen, Phi, Mixtral...): normalize in fp32, cast to the input dtype,
  then multiply by ``weight`` (``LlamaRMSNorm``).
* ``offset=1.0`` (Gemma 1/2/3): normalize in fp32, multiply by ``(1 + weight)`` in fp32, then cast to
  the input dtype (``GemmaRMSNorm``).

Any non-zero ``offset`` follows the Gemma convention with ``(offset + weight)``.
"""

from __future__ import annotations

import torch

from automodel.kernels._backend import resolve_backend

__all__ = ["add_rms_norm", "rms_norm"]


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    offset: float = 0.0,
    backend: str = "auto",
) -> torch.Tensor:
    """Returns ``x`` normalized by its root mean square over the last dim, scaled by ``weight``.

    The statistics are computed in fp32 whatever the input dtype. With ``offset=0.0`` the result
    equals ``LlamaRMSNorm``; with ``offset=1.0`` it equals ``GemmaRMSNorm`` (weight stored as
    ``w`` and applied as ``1 + w``), bit for bit in fp32.

    Args:
        x: input ``[..., hidden]``.
        weight: scale ``[hidden]``.
        eps: added to the mean square before the reciprocal square root.
        offset: added to ``weight`` before scaling (Gemma: ``1.0``); see the module docstring for
            the rounding convention each value follows.
        backend: ``"auto"`` (Triton on CUDA, else PyTorch), ``"torch"`` or ``"triton"``.

    Returns:
        A tensor shaped like ``x``: ``x``'s dtype for Gemma-style (``offset != 0``); for Llama-style
        the type promotion of ``weight`` and ``x`` (the same as ``x`` when both match).

    Example:
        >>> x, w = torch.randn(2, 8, 64), torch.ones(64)
        >>> rms_norm(x, w).shape
        torch.Size([2, 8, 64])
    """
    _check_weight("rms_norm", x, weight)
    if resolve_backend("rms_norm", backend, x.device) == "triton":
        from automodel.kernels._triton.norm import rms_norm_triton

        return rms_norm_triton(x, weight, eps, offset)
    return _rms_norm_torch(x, weight, eps, offset)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float = 1e-6,
    *,
    offset: float = 0.0,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(rms_norm(x + residual), x + residual)``: the pre-norm block's residual step fused.

    Args:
        x: the block output ``[..., hidden]`` to add to the residual stream.
        residual: the residual stream, same shape and dtype as ``x``.
        weight: scale ``[hidden]``.
        eps: added to the mean square before the reciprocal square root.
        offset: as in :func:`rms_norm` (Gemma: ``1.0``).
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``(normed, summed)`` where ``summed = x + residual`` (in ``x``'s dtype) is the new residual
        stream and ``normed = rms_norm(summed, weight, eps, offset=offset)``.

    Example:
        >>> x, r, w = torch.randn(2, 8, 64), torch.randn(2, 8, 64), torch.ones(64)
        >>> normed, summed = add_rms_norm(x, r, w)
        >>> torch.equal(summed, x + r)
        True
    """
    if x.shape != residual.shape or x.dtype != residual.dtype:
        raise ValueError(
            f"add_rms_norm: residual must match x in shape and dtype; got x {tuple(x.shape)} "
            f"{x.dtype} and residual {tuple(residual.shape)} {residual.dtype}. Cast or reshape "
            "the residual stream to the block output's layout"
        )
    _check_weight("add_rms_norm", x, weight)
    if resolve_backend("add_rms_norm", backend, x.device) == "triton":
        from automodel.kernels._triton.norm import add_rms_norm_triton

        return add_rms_norm_triton(x, residual, weight, eps, offset)
    summed = x + residual
    return _rms_norm_torch(summed, weight, eps, offset), summed


def _rms_norm_torch(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float
) -> torch.Tensor:
    """The reference: the exact operation sequence of LlamaRMSNorm / GemmaRMSNorm."""
    h = x.to(torch.float32)
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0.0:
        return weight * h.to(x.dtype)
    return (h * (offset + weight.float())).type_as(x)


def _check_weight(op: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(
            f"{op}: weight must be 1-D with x's last dim ({x.shape[-1]}) elements; got weight of "
            f"shape {tuple(weight.shape)}. Pass the norm's weight vector, e.g. `module.weight`"
        )
