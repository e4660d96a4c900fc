"""Triton RMSNorm and residual-add + RMSNorm, forward and backward (weight grad reduced per program)."""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from automodel.kernels._triton.launch import (
    pdl_kwargs,
    persistent_programs,
    row_block,
    wait_for_inputs,
)

# Launch geometry of the forward kernel and geometry and structure of the backward kernel
# (benchmarks/kernels_bench.py sweeps every key: ``automodel@programs_per_sm=1+prefetch=0``):
# - fwd_rows: rows one forward program normalizes (a [fwd_rows, hidden] tile);
# - fwd_num_warps: per forward program (0: one warp per 512 elements of the tile, 2 to 16: each
#   thread loads two 16-byte vectors of bf16 per tensor. At hidden 2048 on an H200 that is 4
#   warps, 17.7 us, against 19.1 us at 8 warps and one vector a thread: fewer bytes in flight);
# - programs_per_sm: the persistent grid, each program writing one fp32 weight-gradient partial row
#   (0: as many as fill an SM with 32 warps: 2 at hidden 4096, 4 at 2048);
# - rows_per_step: rows a program handles per step;
# - num_warps: per program (0: one warp per 256 elements of the tile, 4 to 16: 16 at hidden 4096);
# - prefetch: 1: each step issues the loads of the program's next rows before it reduces and
#   stores the current ones, so they are in flight across the block-wide reduction; 0: load,
#   reduce, store, one after the other. On an H100 at 8b, 1 took the kernel from 79.8 us to
#   73.7 us (rms_norm) and 105.9 to 98.2 us (add_rms_norm); without it every grid, warp count and
#   rows per step ran at 80-89 us. Loading two steps ahead measured no faster on the H100 and
#   slower on the H200 (twice the registers), so it is not offered;
# - reduce_rows / reduce_cols: the kernel that sums the partials reads ``reduce_cols`` columns per
#   program, ``reduce_rows`` partial rows per step (0: all of them in one step, up to 1024).
#   64 x 32 (five dependent steps over 264 partial rows) took 4.1-4.4 us at both shapes, 6% of
#   rms_norm at 1b: a kernel this small cannot hide its load latency, so fewer steps are cheaper.
TUNING = {
    "fwd_rows": 1,
    "fwd_num_warps": 0,
    "programs_per_sm": 0,
    "rows_per_step": 1,
    "num_warps": 0,
    "prefetch": 1,
    "reduce_rows": 0,
    "reduce_cols": 16,
}


def backward_geometry(device: torch.device, n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """Returns ``(programs, warps, registers)`` of the backward kernel for ``[n_rows, n_cols]``.

    ``programs`` is also the number of fp32 weight-gradient partial rows it writes; ``registers``
    the per-thread cap that lets all of them run at once.
    """
    block = row_block(n_cols)
    num_warps = TUNING["num_warps"] or min(16, max(4, block * TUNING["rows_per_step"] // 256))
    per_sm = TUNING["programs_per_sm"] or max(1, 32 // num_warps)
    programs = persistent_programs(device, n_rows, per_sm)
    return programs, num_warps, _registers_per_thread(per_sm, num_warps)


@triton.jit
def _rms_norm_fwd_kernel(
    X,
    R,
    W,
    Y,
    S,
    RSTD,
    stride_x,
    stride_r,
    stride_y,
    stride_s,
    n_rows,
    n_cols,
    eps,
    offset,
    HAS_RESIDUAL: tl.constexpr,
    GEMMA: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One program: ``BLOCK_R`` rows (int64 row indices: rows * stride can pass 2**31)."""
    wait_for_inputs(USE_PDL)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (rows < n_rows) & (cols < n_cols)
    x = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + rows * stride_r + cols, mask=mask, other=0.0)
        # Round the sum to the storage dtype first: it is the residual stream callers keep.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(S.dtype.element_ty)
        tl.store(S + rows * stride_s + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.math.rsqrt(tl.sum(xf * xf, axis=1) / n_cols + eps)[:, None]
    tl.store(RSTD + rows, rstd, mask=rows < n_rows)
    w = tl.load(W + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    h = xf * rstd
    if GEMMA:
        y = h * (offset + w)
    else:
        # Llama casts the normalized input to its dtype before the weight multiply.
        y = h.to(x.dtype).to(tl.float32) * w
    tl.store(Y + rows * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _rms_norm_bwd_load(
    DY, X, RSTD, DS, first, end, stride_dy, stride_x, stride_ds, n_cols,
    HAS_DS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Returns ``(dy, x, rstd, ds)`` of rows ``first .. first + BLOCK_R`` below ``end`` (0 past it).

    Every tensor here is read exactly once: ``evict_first`` keeps the stream from pushing other
    lines out of L2. ``ds`` is ``dy`` again when there is no summed-stream gradient (never used).
    """
    rows = first + tl.arange(0, BLOCK_R)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (rows < end) & (cols < n_cols)
    dy = tl.load(DY + rows * stride_dy + cols, mask=mask, other=0.0, eviction_policy="evict_first")
    x = tl.load(X + rows * stride_x + cols, mask=mask, other=0.0, eviction_policy="evict_first")
    rstd = tl.load(RSTD + rows, mask=rows < end, other=0.0)
    if HAS_DS:
        ds = tl.load(
            DS + rows * stride_ds + cols, mask=mask, other=0.0, eviction_policy="evict_first"
        )
    else:
        ds = dy
    return dy, x, rstd, ds


@triton.jit
def _rms_norm_bwd_store(
    dy, x, rstd, ds, DX, first, end, w, dw, stride_dx, n_cols,
    HAS_DS: tl.constexpr, GEMMA: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """Writes dx of the loaded rows ``first .. first + BLOCK_R``; returns ``dw`` plus theirs."""
    rows = first + tl.arange(0, BLOCK_R)[:, None]
    cols = tl.arange(0, BLOCK)[None, :]
    mask = (rows < end) & (cols < n_cols)
    dyf = dy.to(tl.float32)
    h = x.to(tl.float32) * rstd
    if GEMMA:
        dw += dyf * h
    else:
        dw += dyf * h.to(x.dtype).to(tl.float32)
    g = dyf * w
    dx = rstd * (g - h * (tl.sum(g * h, axis=1)[:, None] / n_cols))
    if HAS_DS:
        dx += ds.to(tl.float32)
    tl.store(
        DX + rows * stride_dx + cols,
        dx.to(DX.dtype.element_ty),
        mask=mask,
        eviction_policy="evict_first",
    )
    return dw


@triton.jit
def _rms_norm_bwd_kernel(
    DY,
    X,
    W,
    RSTD,
    DX,
    DS,
    DW_PARTIAL,
    stride_dy,
    stride_x,
    stride_dx,
    stride_ds,
    n_rows,
    n_cols,
    rows_per_program,
    offset,
    HAS_DS: tl.constexpr,
    GEMMA: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK: tl.constexpr,
    PREFETCH: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """One program: its slice of rows, ``BLOCK_R`` per step; writes one weight-gradient partial."""
    wait_for_inputs(USE_PDL)
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK)[None, :]
    cmask = cols < n_cols
    w = tl.load(W + cols, mask=cmask, other=0.0).to(tl.float32)
    if GEMMA:
        w = w + offset
    dw = tl.zeros([BLOCK_R, BLOCK], dtype=tl.float32)
    # int64 row indices: rows * stride can pass 2**31 elements.
    start = pid.to(tl.int64) * rows_per_program
    end = tl.minimum(start + rows_per_program, n_rows)
    if PREFETCH == 1:
        # The next step's loads are issued before this step's reduction and store, which they
        # cannot be reordered past: they are in flight while the block reduces (the last step's
        # are fully masked and read nothing).
        dy, x, rstd, ds = _rms_norm_bwd_load(
            DY, X, RSTD, DS, start, end, stride_dy, stride_x, stride_ds, n_cols,
            HAS_DS, BLOCK_R, BLOCK,
        )  # fmt: skip
        for first in range(start, end, BLOCK_R):
            next_dy, next_x, next_rstd, next_ds = _rms_norm_bwd_load(
                DY, X, RSTD, DS, first + BLOCK_R, end, stride_dy, stride_x, stride_ds, n_cols,
                HAS_DS, BLOCK_R, BLOCK,
            )  # fmt: skip
            dw = _rms_norm_bwd_store(
                dy, x, rstd, ds, DX, first, end, w, dw, stride_dx, n_cols,
                HAS_DS, GEMMA, BLOCK_R, BLOCK,
            )  # fmt: skip
            dy, x, rstd, ds = next_dy, next_x, next_rstd, next_ds
    else:
        for first in range(start, end, BLOCK_R):
            dy, x, rstd, ds = _rms_norm_bwd_load(
                DY, X, RSTD, DS, first, end, stride_dy, stride_x, stride_ds, n_cols,
                HAS_DS, BLOCK_R, BLOCK,
            )  # fmt: skip
            dw = _rms_norm_bwd_store(
                dy, x, rstd, ds, DX, first, end, w, dw, stride_dx, n_cols,
                HAS_DS, GEMMA, BLOCK_R, BLOCK,
            )  # fmt: skip
    tl.store(DW_PARTIAL + pid * n_cols + cols, tl.sum(dw, axis=0)[None, :], mask=cmask)


@triton.jit
def _dw_reduce_kernel(
    PARTIAL,
    DW,
    n_partials,
    n_cols,
    BLOCK_P: tl.constexpr,
    BLOCK_C: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    """Sums ``BLOCK_C`` columns of the ``[n_partials, n_cols]`` fp32 partials, cast to DW's dtype."""
    wait_for_inputs(USE_PDL)
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for first in range(0, n_partials, BLOCK_P):
        rows = first + tl.arange(0, BLOCK_P)[:, None]
        mask = (rows < n_partials) & (cols < n_cols)
        acc += tl.load(PARTIAL + rows * n_cols + cols, mask=mask, other=0.0)
    total = tl.sum(acc, axis=0)[None, :]
    tl.store(DW + cols, total.to(DW.dtype.element_ty), mask=cols < n_cols)


def _forward_warps(tile: int) -> int:
    """Returns the forward's warps for a ``tile``-element program: one per 512 elements, 2 to 16."""
    return max(2, min(16, tile // 512))


def _registers_per_thread(programs_per_sm: int, num_warps: int) -> int:
    """Returns the register cap that lets ``programs_per_sm`` programs share one SM's registers.

    The persistent grid assumes all its programs run at once; without the cap the compiler may
    take more registers than that allows (95 per thread for add_rms_norm's prefetching backward at
    16 warps: one program per SM fits, the second half of the grid would run as a second wave).
    An SM has 65536 32-bit registers; a thread can address at most 255; allocation is by 8.
    """
    per_thread = 65536 // (programs_per_sm * num_warps * 32)
    return max(24, min(255, per_thread - per_thread % 8))


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """Returns ``t`` as a 2-D [rows, hidden] view with a unit last stride (copying only if needed)."""
    t2 = t.reshape(-1, t.shape[-1])
    return t2 if t2.stride(-1) == 1 else t2.contiguous()


def _forward(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    offset: float,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    x2 = _as_rows(x)
    n_rows, n_cols = x2.shape
    out_dtype = x.dtype if offset != 0.0 else torch.promote_types(weight.dtype, x.dtype)
    y = torch.empty((n_rows, n_cols), dtype=out_dtype, device=x.device)
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    r2 = _as_rows(residual) if residual is not None else x2
    summed = torch.empty_like(x2) if residual is not None else x2
    block = row_block(n_cols)
    fwd_rows = TUNING["fwd_rows"]
    _rms_norm_fwd_kernel[(triton.cdiv(n_rows, fwd_rows),)](
        x2,
        r2,
        weight,
        y,
        summed,
        rstd,
        x2.stride(0),
        r2.stride(0),
        y.stride(0),
        summed.stride(0),
        n_rows,
        n_cols,
        eps,
        offset,
        HAS_RESIDUAL=residual is not None,
        GEMMA=offset != 0.0,
        BLOCK_R=fwd_rows,
        BLOCK=block,
        num_warps=TUNING["fwd_num_warps"] or _forward_warps(block * fwd_rows),
        **pdl_kwargs(x.device),
    )
    return y, (summed if residual is not None else None), rstd


def _backward(
    dy: torch.Tensor,
    x2: torch.Tensor,
    weight: torch.Tensor,
    rstd: torch.Tensor,
    offset: float,
    d_summed: torch.Tensor | None,
    need_dw: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    n_rows, n_cols = x2.shape
    dy2 = _as_rows(dy)
    dx = torch.empty_like(x2)
    ds2 = _as_rows(d_summed) if d_summed is not None else dy2
    programs, num_warps, registers = backward_geometry(x2.device, n_rows, n_cols)
    rows_per_program = triton.cdiv(n_rows, programs)
    dw_partial = torch.empty((programs, n_cols), dtype=torch.float32, device=x2.device)
    block = row_block(n_cols)
    rows_per_step = TUNING["rows_per_step"]
    if TUNING["prefetch"] not in (0, 1):
        raise ValueError(
            f"TUNING['prefetch'] must be 0 or 1 (steps loaded ahead); got "
            f"{TUNING['prefetch']!r}. Set it to one of those"
        )
    _rms_norm_bwd_kernel[(programs,)](
        dy2,
        x2,
        weight,
        rstd,
        dx,
        ds2,
        dw_partial,
        dy2.stride(0),
        x2.stride(0),
        dx.stride(0),
        ds2.stride(0),
        n_rows,
        n_cols,
        rows_per_program,
        offset,
        HAS_DS=d_summed is not None,
        GEMMA=offset != 0.0,
        BLOCK_R=rows_per_step,
        BLOCK=block,
        PREFETCH=TUNING["prefetch"],
        num_warps=num_warps,
        # NVIDIA only: Triton's ROCm backend has no such option (and other register files).
        **({"maxnreg": registers} if torch.version.hip is None else {}),
        **pdl_kwargs(x2.device),
    )
    if not need_dw:
        return dx, None
    # One small kernel sums the partials and casts (torch's column sum of [programs, hidden] took
    # 18 us at 528 x 4096 on an H100, more than a tenth of the whole fwd + bwd).
    dw = torch.empty(n_cols, dtype=weight.dtype, device=x2.device)
    reduce_cols = TUNING["reduce_cols"]
    reduce_rows = TUNING["reduce_rows"] or min(1024, triton.next_power_of_2(programs))
    _dw_reduce_kernel[(triton.cdiv(n_cols, reduce_cols),)](
        dw_partial,
        dw,
        programs,
        n_cols,
        BLOCK_P=reduce_rows,
        BLOCK_C=reduce_cols,
        num_warps=max(4, min(16, reduce_rows * reduce_cols // 1024)),  # 32 fp32 a thread
        **pdl_kwargs(x2.device),
    )
    return dx, dw


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float
    ) -> torch.Tensor:
        weight = weight.contiguous()
        y, _, rstd = _forward(x, None, weight, eps, offset)
        ctx.save_for_backward(_as_rows(x), weight, rstd)
        ctx.offset = offset
        return y.view(x.shape)

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        x2, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(dy, x2, weight, rstd, ctx.offset, None, ctx.needs_input_grad[1])
        return dx.view(dy.shape), dw, None, None


class _AddRMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        x: torch.Tensor,
        residual: torch.Tensor,
        weight: torch.Tensor,
        eps: float,
        offset: float,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        weight = weight.contiguous()
        y, summed, rstd = _forward(x, residual, weight, eps, offset)
        assert summed is not None
        ctx.save_for_backward(summed, weight, rstd)
        ctx.offset = offset
        return y.view(x.shape), summed.view(x.shape)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, dy: torch.Tensor, d_summed: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        summed, weight, rstd = ctx.saved_tensors
        dx, dw = _backward(dy, summed, weight, rstd, ctx.offset, d_summed, ctx.needs_input_grad[2])
        dx = dx.view(dy.shape)
        # x + residual: both inputs receive the same gradient.
        return dx, dx, dw, None, None


def rms_norm_triton(
    x: torch.Tensor, weight: torch.Tensor, eps: float, offset: float
) -> torch.Tensor:
    """Returns the Triton RMSNorm of ``x`` (same contract as ``automodel.kernels.rms_norm``)."""
    return _RMSNorm.apply(x, weight, eps, offset)


def add_rms_norm_triton(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, offset: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(rms_norm(x + residual), x + residual)`` from one Triton pass."""
    return _AddRMSNorm.apply(x, residual, weight, eps, offset)
