"""Triton SwiGLU / GeGLU: the activation and the product in one pass, forward and backward."""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from automodel.kernels._triton.launch import pdl_kwargs, wait_for_inputs

# Elements per program and warps per program; benchmarks/kernels_bench.py sweeps them
# (``automodel@block=2048+num_warps=8``).
TUNING = {"block": 1024, "num_warps": 4}
# Constants inside the kernels are literals: compiled Triton (3.2+) rejects plain module globals.
# 0.7978845608028654 = sqrt(2 / pi), 0.7071067811865476 = 1 / sqrt(2),
# 0.3989422804014327 = 1 / sqrt(2 pi).

# Activation codes for the ACT constexpr.
_SILU, _GELU_TANH, _GELU_ERF = 0, 1, 2


@triton.jit
def _act_and_grad(g, ACT: tl.constexpr):
    """Returns (act(g), act'(g)) in fp32."""
    # One return at the end: Triton's compiler rejects returns inside constexpr branches.
    if ACT == 0:
        sig = tl.sigmoid(g)
        act = g * sig
        d_act = sig * (1.0 + g * (1.0 - sig))
    elif ACT == 1:
        inner = 0.7978845608028654 * (g + 0.044715 * g * g * g)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0  # tanh(inner)
        d_inner = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * g * g)
        act = 0.5 * g * (1.0 + t)
        d_act = 0.5 * (1.0 + t) + 0.5 * g * (1.0 - t * t) * d_inner
    else:
        cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
        act = g * cdf
        d_act = cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g)
    return act, d_act


@triton.jit
def _gated_fwd_kernel(
    G, U, Y, n, ACT: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr
):  # fmt: skip
    wait_for_inputs(USE_PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    act, _ = _act_and_grad(g, ACT)
    tl.store(Y + offs, (act * u).to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _gated_bwd_kernel(
    DY, G, U, DG, DU, n, ACT: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr
):  # fmt: skip
    wait_for_inputs(USE_PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(U + offs, mask=mask, other=0.0).to(tl.float32)
    act, d_act = _act_and_grad(g, ACT)
    tl.store(DG + offs, (dy * u * d_act).to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, (dy * act).to(DU.dtype.element_ty), mask=mask)


class _Gated(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, gate: torch.Tensor, up: torch.Tensor, act: int) -> torch.Tensor:  # type: ignore[override]
        gate, up = gate.contiguous(), up.contiguous()
        out = torch.empty_like(gate)
        n, block = gate.numel(), TUNING["block"]
        _gated_fwd_kernel[(triton.cdiv(n, block),)](
            gate, up, out, n, ACT=act, BLOCK=block, num_warps=TUNING["num_warps"],
            **pdl_kwargs(gate.device),
        )  # fmt: skip
        ctx.save_for_backward(gate, up)
        ctx.act = act
        return out

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        gate, up = ctx.saved_tensors
        dy = dy.contiguous()
        d_gate, d_up = torch.empty_like(gate), torch.empty_like(up)
        n, block = gate.numel(), TUNING["block"]
        _gated_bwd_kernel[(triton.cdiv(n, block),)](
            dy, gate, up, d_gate, d_up, n, ACT=ctx.act, BLOCK=block, num_warps=TUNING["num_warps"],
            **pdl_kwargs(gate.device),
        )  # fmt: skip
        return d_gate, d_up, None


def swiglu_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """Returns ``silu(gate) * up`` from one Triton pass."""
    return _Gated.apply(gate, up, _SILU)


def geglu_triton(gate: torch.Tensor, up: torch.Tensor, approximate: str) -> torch.Tensor:
    """Returns ``gelu(gate, approximate) * up`` from one Triton pass."""
    return _Gated.apply(gate, up, _GELU_TANH if approximate == "tanh" else _GELU_ERF)
