"""Triton rotary apply for q and k in one launch (rotate-half convention, partial rotary)."""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from automodel.kernels._triton.launch import pdl_kwargs, wait_for_inputs

# Warps per program (one program rotates every head of one token; 0: one warp per 512 elements of
# the query heads, 2 to 16: 4 at 32 x 64, 8 at 32 x 128). benchmarks/kernels_bench.py sweeps it
# (``automodel@num_warps=8``).
TUNING = {"num_warps": 0}


@triton.jit
def _load_halves(X, b, s, n_heads, sx_b, sx_h, sx_s, half, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):  # fmt: skip
    """Returns the two rotary halves ``[BLOCK_H, BLOCK_HALF]`` of every head of one token, in fp32."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (cols < half)
    row = X + b * sx_b + s * sx_s + heads * sx_h
    x1 = tl.load(row + cols, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(row + half + cols, mask=mask, other=0.0).to(tl.float32)
    return x1, x2


@triton.jit
def _store_rotated(
    x1, x2, X, OUT, c1, c2, s1, s2, b, s, n_heads, sx_b, sx_h, sx_s, so_b, so_h, so_s,
    half, head_dim, BACKWARD: tl.constexpr, HAS_PASS: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_PASS: tl.constexpr,
):  # fmt: skip
    """Writes the rotation of the loaded halves (and copies the pass-through columns)."""
    heads = tl.arange(0, BLOCK_H)[:, None]
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    mask = (heads < n_heads) & (cols < half)
    o_row = OUT + b * so_b + s * so_s + heads * so_h
    if BACKWARD:
        # The transpose of the rotation: [[c1, -s1], [s2, c2]]^T.
        y1 = x1 * c1 + x2 * s2
        y2 = x2 * c2 - x1 * s1
    else:
        y1 = x1 * c1 - x2 * s1
        y2 = x2 * c2 + x1 * s2
    tl.store(o_row + cols, y1.to(OUT.dtype.element_ty), mask=mask)
    tl.store(o_row + half + cols, y2.to(OUT.dtype.element_ty), mask=mask)
    if HAS_PASS:
        x_row = X + b * sx_b + s * sx_s + heads * sx_h
        pass_cols = 2 * half + tl.arange(0, BLOCK_PASS)[None, :]
        pass_mask = (heads < n_heads) & (pass_cols < head_dim)
        tl.store(o_row + pass_cols, tl.load(x_row + pass_cols, mask=pass_mask), mask=pass_mask)


@triton.jit
def _rope_kernel(
    Q,
    K,
    QO,
    KO,
    COS,
    SIN,
    seq_len,
    n_q_heads,
    n_k_heads,
    sq_b,
    sq_h,
    sq_s,
    sk_b,
    sk_h,
    sk_s,
    sqo_b,
    sqo_h,
    sqo_s,
    sko_b,
    sko_h,
    sko_s,
    sc_b,
    sc_s,
    half,
    head_dim,
    BACKWARD: tl.constexpr,
    HAS_PASS: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One program: one token's query and key heads.

    Every load of q and k is issued before the first store: a store may alias a later load as far
    as the compiler knows, so loading k after q's stores would halve the bytes in flight (8% slower
    at Llama-3.2-1B's 32 x 64 heads on an H200).
    """
    wait_for_inputs(USE_PDL)
    pid = tl.program_id(0).to(tl.int64)
    b = pid // seq_len
    s = pid % seq_len
    cols = tl.arange(0, BLOCK_HALF)[None, :]
    cmask = cols < half
    table = b * sc_b + s * sc_s
    c1 = tl.load(COS + table + cols, mask=cmask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + table + half + cols, mask=cmask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + table + cols, mask=cmask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + table + half + cols, mask=cmask, other=0.0).to(tl.float32)
    q1, q2 = _load_halves(Q, b, s, n_q_heads, sq_b, sq_h, sq_s, half, BLOCK_HQ, BLOCK_HALF)
    k1, k2 = _load_halves(K, b, s, n_k_heads, sk_b, sk_h, sk_s, half, BLOCK_HK, BLOCK_HALF)
    _store_rotated(
        q1, q2, Q, QO, c1, c2, s1, s2, b, s, n_q_heads, sq_b, sq_h, sq_s, sqo_b, sqo_h, sqo_s,
        half, head_dim, BACKWARD, HAS_PASS, BLOCK_HQ, BLOCK_HALF, BLOCK_PASS,
    )  # fmt: skip
    _store_rotated(
        k1, k2, K, KO, c1, c2, s1, s2, b, s, n_k_heads, sk_b, sk_h, sk_s, sko_b, sko_h, sko_s,
        half, head_dim, BACKWARD, HAS_PASS, BLOCK_HK, BLOCK_HALF, BLOCK_PASS,
    )  # fmt: skip


def _warps(block_heads: int, block_half: int) -> int:
    """Returns the warps of one program: ``TUNING``'s, or one per 512 query elements (2 to 16)."""
    return TUNING["num_warps"] or max(2, min(16, block_heads * block_half * 2 // 512))


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _rotate(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    q, k = _unit_last_stride(q), _unit_last_stride(k)
    batch, n_q_heads, seq_len, head_dim = q.shape
    cos = _unit_last_stride(cos.expand(batch, -1, -1))
    sin = _unit_last_stride(sin.expand(batch, -1, -1))
    if cos.stride() != sin.stride():
        cos, sin = cos.contiguous(), sin.contiguous()
    rot_dim = cos.shape[-1]
    # empty_like keeps q's memory layout (e.g. [B, S, H, D] storage viewed as [B, H, S, D]).
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    pass_dim = head_dim - rot_dim
    _rope_kernel[(batch * seq_len,)](
        q, k, q_out, k_out, cos, sin, seq_len, n_q_heads, k.shape[1],
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2),
        k_out.stride(0), k_out.stride(1), k_out.stride(2),
        cos.stride(0), cos.stride(1), rot_dim // 2, head_dim,
        BACKWARD=backward,
        HAS_PASS=pass_dim > 0,
        BLOCK_HQ=triton.next_power_of_2(n_q_heads),
        BLOCK_HK=triton.next_power_of_2(k.shape[1]),
        BLOCK_HALF=triton.next_power_of_2(rot_dim // 2),
        BLOCK_PASS=triton.next_power_of_2(max(pass_dim, 1)),
        num_warps=_warps(triton.next_power_of_2(n_q_heads), triton.next_power_of_2(rot_dim // 2)),
        **pdl_kwargs(q.device),
    )  # fmt: skip
    return q_out, k_out


class _ApplyRotary(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ctx.save_for_backward(cos, sin)
        return _rotate(q, k, cos, sin, backward=False)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, dq: torch.Tensor, dk: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        cos, sin = ctx.saved_tensors
        dq_in, dk_in = _rotate(dq, dk, cos, sin, backward=True)
        # cos and sin are position tables: no gradient flows to them.
        return dq_in, dk_in, None, None


def apply_rotary_triton(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns rotated ``(q, k)`` from one Triton launch (same contract as ``apply_rotary``)."""
    return _ApplyRotary.apply(q, k, cos, sin)
