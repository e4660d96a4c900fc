"""Triton kernels of the MoE unpermute: gather a token's ``k`` expert rows, weight and sum them.

Two kernels, one program per token, no atomics (deterministic), fp32 accumulation:

- ``gather_sum``: ``out[t] = sum_j w[t, j] * y[slots[t, j]]`` (``w`` optional: a plain sum). It is
  the unpermute forward and, without weights, the permute backward (a token's gradient is the sum
  of the gradients of its ``k`` copies).
- ``gather_sum_backward``: the unpermute backward in one pass over ``y``: writes
  ``grad_y[slots[t, j]] = w[t, j] * g[t]`` and ``grad_w[t, j] = <g[t], y[slots[t, j]]>``.

Imported only when the Triton backend runs (CUDA, or TRITON_INTERPRET=1 in the tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from automodel.kernels._triton.launch import row_block, warps_for

_MAX_BLOCK = 4096  # columns one program holds at once; wider rows loop


@triton.jit
def _gather_sum_kernel(
    Y,
    SLOTS,
    W,
    OUT,
    n_cols,
    TOP_K: tl.constexpr,
    HAS_W: tl.constexpr,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        row = tl.load(SLOTS + token * TOP_K + j).to(tl.int64)
        y = tl.load(Y + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_W:
            y = y * tl.load(W + token * TOP_K + j).to(tl.float32)
        acc += y
    tl.store(OUT + token * n_cols + cols, acc.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _gather_sum_backward_kernel(
    G,
    Y,
    SLOTS,
    W,
    GRAD_Y,
    GRAD_W,
    n_cols,
    TOP_K: tl.constexpr,
    BLOCK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    for j in tl.static_range(TOP_K):
        row = tl.load(SLOTS + token * TOP_K + j).to(tl.int64)
        w = tl.load(W + token * TOP_K + j).to(tl.float32)
        dot = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, n_cols, BLOCK):
            cols = start + offs
            mask = cols < n_cols
            g = tl.load(G + token * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            y = tl.load(Y + row * n_cols + cols, mask=mask, other=0.0).to(tl.float32)
            dot += g * y
            grad_y = (g * w).to(GRAD_Y.dtype.element_ty)
            tl.store(GRAD_Y + row * n_cols + cols, grad_y, mask=mask)
        tl.store(GRAD_W + token * TOP_K + j, tl.sum(dot, axis=0))


def gather_sum_triton(
    y: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor | None
) -> torch.Tensor:
    """Returns ``[T, H]`` in ``y``'s dtype: ``sum_j weights[t, j] * y[slots[t, j]]`` (fp32 sums)."""
    tokens, top_k = slots.shape
    n_cols = y.shape[1]
    out = torch.empty(tokens, n_cols, dtype=y.dtype, device=y.device)
    if tokens == 0 or n_cols == 0:
        return out
    block = min(row_block(n_cols), _MAX_BLOCK)
    grid = (tokens, triton.cdiv(n_cols, block))
    w = weights.contiguous() if weights is not None else slots  # unused when HAS_W is False
    _gather_sum_kernel[grid](
        y.contiguous(),
        slots.contiguous(),
        w,
        out,
        n_cols,
        TOP_K=top_k,
        HAS_W=weights is not None,
        BLOCK=block,
        num_warps=warps_for(block),
    )
    return out


def gather_sum_backward_triton(
    grad: torch.Tensor, y: torch.Tensor, slots: torch.Tensor, weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(grad_y [N, H] like y, grad_weights [T, k] fp32)`` of the weighted gather-sum."""
    tokens, top_k = slots.shape
    n_cols = y.shape[1]
    grad_y = torch.empty_like(y)
    grad_w = torch.empty(tokens, top_k, dtype=torch.float32, device=y.device)
    if tokens == 0 or n_cols == 0:
        return grad_y.zero_(), grad_w.zero_()
    block = min(row_block(n_cols), _MAX_BLOCK)
    _gather_sum_backward_kernel[(tokens,)](
        grad.contiguous(),
        y.contiguous(),
        slots.contiguous(),
        weights.contiguous(),
        grad_y,
        grad_w,
        n_cols,
        TOP_K=top_k,
        BLOCK=block,
        num_warps=warps_for(block),
    )
    return grad_y, grad_w
