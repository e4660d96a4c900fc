"""Triton SwiGLU on the packed ``[N, 2I]`` gate/up output of the experts' first grouped GEMM.

The forward reads both halves of each row in place (no ``chunk(...).contiguous()`` copies) and the
backward writes the ``[N, 2I]`` gradient directly (no ``cat`` of two ``[N, I]`` halves). fp32 math.
Imported only when the Triton backend runs (CUDA, or TRITON_INTERPRET=1 in the tests).
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from automodel.kernels._triton.launch import row_block, warps_for

_MAX_BLOCK = 2048  # columns of one half a program handles; wider halves use more programs


@triton.jit
def _swiglu_packed_fwd_kernel(GU, OUT, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(GU + row * 2 * inter + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * 2 * inter + inter + cols, mask=mask, other=0.0).to(tl.float32)
    out = g * tl.sigmoid(g) * u
    tl.store(OUT + row * inter + cols, out.to(OUT.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_packed_bwd_kernel(DY, GU, DGU, inter, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < inter
    dy = tl.load(DY + row * inter + cols, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(GU + row * 2 * inter + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * 2 * inter + inter + cols, mask=mask, other=0.0).to(tl.float32)
    sig = tl.sigmoid(g)
    d_gate = dy * u * sig * (1.0 + g * (1.0 - sig))
    d_up = dy * g * sig
    tl.store(DGU + row * 2 * inter + cols, d_gate.to(DGU.dtype.element_ty), mask=mask)
    tl.store(DGU + row * 2 * inter + inter + cols, d_up.to(DGU.dtype.element_ty), mask=mask)


def _grid(rows: int, inter: int) -> tuple[tuple[int, int], int]:
    block = min(row_block(inter), _MAX_BLOCK)
    return (rows, triton.cdiv(inter, block)), block


class _SwigluPacked(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate_up: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        gate_up = gate_up.contiguous()
        rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
        out = torch.empty(rows, inter, dtype=gate_up.dtype, device=gate_up.device)
        if rows and inter:
            grid, block = _grid(rows, inter)
            _swiglu_packed_fwd_kernel[grid](
                gate_up, out, inter, BLOCK=block, num_warps=warps_for(block)
            )
        ctx.save_for_backward(gate_up)
        return out

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        (gate_up,) = ctx.saved_tensors
        rows, inter = gate_up.shape[0], gate_up.shape[1] // 2
        grad = torch.empty_like(gate_up)
        if rows and inter:
            grid, block = _grid(rows, inter)
            _swiglu_packed_bwd_kernel[grid](
                dy.contiguous(), gate_up, grad, inter, BLOCK=block, num_warps=warps_for(block)
            )
        return grad


def swiglu_packed_triton(gate_up: torch.Tensor) -> torch.Tensor:
    """Returns ``[N, I]``: ``silu(gate_up[:, :I]) * gate_up[:, I:]`` from one Triton pass."""
    out: torch.Tensor = _SwigluPacked.apply(gate_up)
    return out
