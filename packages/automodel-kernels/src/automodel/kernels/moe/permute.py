"""Token permutation for MoE: group token copies by expert, and bring expert outputs back."""

from __future__ import annotations

import torch


def permute(
    x: torch.Tensor, indices: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(permuted [T*k, H], row_map [T*k], tokens_per_expert [E])``.

    Row ``r`` of ``permuted`` is ``x[row_map[r] // k]``, the copy of a token for its
    ``(row_map[r] % k)``-th expert; rows are grouped by expert in expert order (a stable sort, so
    tokens keep their order within an expert) as :func:`grouped_mm` expects. ``tokens_per_expert``
    is int64 and computed on device (no host sync). Differentiable with respect to ``x``.

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
    row_map = torch.argsort(flat, stable=True)
    tokens_per_expert = torch.zeros(num_experts, dtype=torch.long, device=x.device).scatter_add_(
        0, flat, torch.ones_like(flat)
    )
    return x[row_map // top_k], row_map, tokens_per_expert


def unpermute(y: torch.Tensor, row_map: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Returns ``[T, H]``: each token's expert outputs ``y`` summed with its routing ``weights``.

    ``out[t] = sum_j weights[t, j] * y[r]`` where ``row_map[r] == t * k + j``. The sum runs in a fixed
    order (no atomics), so it is deterministic; the result has ``y``'s dtype. Differentiable with
    respect to ``y`` and ``weights``.

    Example:
        >>> x = torch.randn(3, 2)
        >>> idx, w = torch.tensor([[1, 0], [1, 2], [0, 1]]), torch.full((3, 2), 0.5)
        >>> permuted, row_map, _ = permute(x, idx, 3)
        >>> torch.allclose(unpermute(permuted, row_map, w), x)
        True
    """
    tokens, top_k = weights.shape
    if y.shape[0] != tokens * top_k or row_map.shape != (tokens * top_k,):
        raise ValueError(
            f"unpermute: y [{y.shape[0]}, H] and row_map {tuple(row_map.shape)} must both have "
            f"T*k = {tokens * top_k} rows for weights {tuple(weights.shape)}"
        )
    inverse = torch.empty_like(row_map).scatter_(
        0, row_map, torch.arange(row_map.numel(), device=row_map.device)
    )
    per_token = y[inverse].view(tokens, top_k, -1)
    return torch.einsum("tkh,tk->th", per_token, weights.to(y.dtype))
