"""Token permutation for MoE: group token copies by expert, and bring expert outputs back.

Both directions are gathers with hand-written backwards (no ``index_put`` with its sort and
atomics): a token's gradient is the sum of its ``k`` copies' gradients, and the weighted sum of a
token's expert outputs runs in one Triton kernel on CUDA (fp32 accumulation, forward and backward;
``backend="torch"`` is the reference).
"""

from __future__ import annotations

from typing import Any

import torch

from automodel.kernels._backend import resolve_backend

PERMUTE_BACKENDS = ("torch", "triton")


def permute(
    x: torch.Tensor, indices: torch.Tensor, num_experts: int, *, backend: str = "auto"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(permuted [T*k, H], row_map [T*k], tokens_per_expert [E])``.

    Row ``r`` of ``permuted`` is ``x[row_map[r] // k]``, the copy of a token for its
    ``(row_map[r] % k)``-th expert; rows are grouped by expert in expert order (a stable sort, so
    tokens keep their order within an expert) as :func:`grouped_mm` expects. ``tokens_per_expert``
    is int64 and computed on device (no host sync). Differentiable with respect to ``x``; the
    backward sums each token's ``k`` row gradients (``backend``: ``"auto"`` = Triton on CUDA,
    ``"torch"``, ``"triton"``).

    Example:
        >>> x = torch.arange(6.0).view(3, 2)
        >>> permuted, row_map, counts = permute(x, torch.tensor([[1, 0], [1, 2], [0, 1]]), 3)
        >>> counts.tolist(), row_map.tolist()
        ([2, 3, 1], [1, 4, 0, 2, 5, 3])
    """
    if indices.dim() != 2 or indices.shape[0] != x.shape[0]:
        raise ValueError(
            f"permute: indices must be [T, k] with T = x.shape[0] = {x.shape[0]}, got "
            f"{tuple(indices.shape)}"
        )
    top_k = indices.shape[1]
    flat = indices.reshape(-1)
    # Narrow sort keys: a radix sort makes one pass per key byte (2 instead of 8 for int64).
    keys = flat.to(torch.int16 if num_experts <= torch.iinfo(torch.int16).max else torch.int32)
    row_map = torch.argsort(keys, stable=True)
    # scatter_add, not bincount: bincount sizes its output on the host (a sync on CUDA).
    tokens_per_expert = torch.zeros(num_experts, dtype=torch.long, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )
    choice = resolve_backend("permute", backend, x.device, choices=PERMUTE_BACKENDS)
    permuted: torch.Tensor = _Permute.apply(x, row_map, top_k, choice)
    return permuted, row_map, tokens_per_expert


def unpermute(
    y: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor, *, backend: str = "auto"
) -> torch.Tensor:
    """Returns ``[T, H]``: each token's expert outputs ``y`` summed with its routing ``weights``.

    ``out[t] = sum_j weights[t, j] * y[r]`` where ``row_map[r] == t * k + j``. The products and the
    sum run in fp32 in a fixed order (no atomics), so it is deterministic; the result has ``y``'s
    dtype. Differentiable with respect to ``y`` and ``weights`` (whose gradient has their dtype).
    ``backend``: ``"auto"`` (one Triton kernel each way on CUDA), ``"torch"`` or ``"triton"``.

    Example:
        >>> x = torch.randn(3, 2)
        >>> idx, w = torch.tensor([[1, 0], [1, 2], [0, 1]]), torch.full((3, 2), 0.5)
        >>> permuted, row_map, _ = permute(x, idx, 3)
        >>> torch.allclose(unpermute(permuted, row_map, w), x)
        True
    """
    tokens, top_k = weights.shape
    if y.dim() != 2 or y.shape[0] != tokens * top_k or row_map.shape != (tokens * top_k,):
        raise ValueError(
            f"unpermute: y [{y.shape[0]}, H] and row_map {tuple(row_map.shape)} must both have "
            f"T*k = {tokens * top_k} rows for weights {tuple(weights.shape)}"
        )
    choice = resolve_backend("unpermute", backend, y.device, choices=PERMUTE_BACKENDS)
    out: torch.Tensor = _Unpermute.apply(y, _slots(row_map).view(tokens, top_k), weights, choice)
    return out


def _slots(row_map: torch.Tensor) -> torch.Tensor:
    """Returns the inverse permutation of ``row_map``: for each ``t * k + j``, its row."""
    return torch.empty_like(row_map).scatter_(
        0, row_map, torch.arange(row_map.numel(), device=row_map.device)
    )


def _gather_sum(
    y: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor | None, backend: str
) -> torch.Tensor:
    """Returns ``[T, H]`` like ``y``: ``sum_j weights[t, j] * y[slots[t, j]]`` summed in fp32."""
    if backend == "triton":
        from automodel.kernels.moe._triton_permute import gather_sum_triton

        return gather_sum_triton(y, slots, weights)
    rows = y[slots.reshape(-1)].view(*slots.shape, y.shape[-1]).float()
    if weights is not None:
        rows = rows * weights.float().unsqueeze(-1)
    return rows.sum(dim=1).to(y.dtype)


class _Permute(torch.autograd.Function):
    """``x[row_map // k]`` whose backward sums each token's ``k`` row gradients (a gather)."""

    @staticmethod
    def forward(
        ctx: Any, x: torch.Tensor, row_map: torch.Tensor, top_k: int, backend: str
    ) -> torch.Tensor:
        ctx.save_for_backward(row_map)
        ctx.top_k, ctx.backend = top_k, backend
        return x.index_select(0, torch.div(row_map, top_k, rounding_mode="floor"))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (row_map,) = ctx.saved_tensors
        slots = _slots(row_map).view(-1, ctx.top_k)
        return _gather_sum(grad, slots, None, ctx.backend), None, None, None


class _Unpermute(torch.autograd.Function):
    """The weighted gather-sum of :func:`unpermute`; backward in one pass over ``y``."""

    @staticmethod
    def forward(
        ctx: Any, y: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor, backend: str
    ) -> torch.Tensor:
        ctx.save_for_backward(y, slots, weights)
        ctx.backend = backend
        return _gather_sum(y, slots, weights, backend)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        y, slots, weights = ctx.saved_tensors
        if ctx.backend == "triton":
            from automodel.kernels.moe._triton_permute import gather_sum_backward_triton

            grad_y, grad_w = gather_sum_backward_triton(grad, y, slots, weights)
        else:
            g = grad.float()
            per_slot = g.unsqueeze(1) * weights.float().unsqueeze(-1)  # [T, k, H]
            grad_y = torch.empty_like(y)
            grad_y[slots.reshape(-1)] = per_slot.reshape(-1, y.shape[-1]).to(y.dtype)
            grad_w = torch.einsum(
                "th,tkh->tk", g, y[slots.reshape(-1)].view(*slots.shape, -1).float()
            )
        return grad_y, None, grad_w.to(weights.dtype), None
