"""Triton cross-entropy: an online-softmax statistics pass and a gradient pass over the vocab.

The statistics kernel reads each row of logits once (running max and sum of exponentials, the label
logit, and the logit sum for label smoothing); the loss is assembled from these ``[N]`` vectors in
PyTorch, where a vocab sharded over a process group is all-reduced. The gradient kernel reads the
row again and writes ``d loss / d logits`` scaled per row, possibly in place over the logits. When
the whole vocab is local (no tensor parallelism), ``linear_cross_entropy`` uses one fused kernel per
chunk instead: statistics, loss and the gradient written over the logits, in one launch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _row_stats(
    base,
    n_cols,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    NEED_Z_SUM: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Returns (max, sum of exp(z - max), sum of z or 0) of one row, read once (online softmax)."""
    row_max = tl.zeros([], dtype=tl.float32) - float("inf")
    sum_exp = tl.zeros([], dtype=tl.float32)
    z_sum = tl.zeros([], dtype=tl.float32)
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        z = tl.load(base + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            z = softcap * _tanh(z / softcap)
        if NEED_Z_SUM:  # label smoothing's mean logit
            z_sum += tl.sum(tl.where(mask, z, 0.0), axis=0)
        z = tl.where(mask, z, float("-inf"))
        new_max = tl.maximum(row_max, tl.max(z, axis=0))
        sum_exp = sum_exp * tl.exp(row_max - new_max) + tl.sum(tl.exp(z - new_max), axis=0)
        row_max = new_max
    return row_max, sum_exp, z_sum


@triton.jit
def _write_row_grad(
    src,
    dst,
    n_cols,
    local_label,
    lse,
    scale,
    vocab_size,
    softcap,
    label_smoothing,
    z_loss_weight,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Writes ``scale * d loss / d z`` of one row (``src``'s logits) to ``dst`` (may be ``src``).

    ``local_label`` is the label's column in this row slice (out of range when another vocab shard
    owns it, or the token is ignored); ``vocab_size`` is the whole vocab, for label smoothing.
    """
    # d(lse + w * lse^2)/dz = softmax * (1 + 2 w lse).
    softmax_coef = 1.0 + 2.0 * z_loss_weight * lse
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = cols < n_cols
        z = tl.load(src + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_SOFTCAP:
            t = _tanh(z / softcap)
            z = softcap * t
        g = tl.exp(z - lse) * softmax_coef - label_smoothing / vocab_size
        g = tl.where(cols == local_label, g - (1.0 - label_smoothing), g)
        if HAS_SOFTCAP:
            g = g * (1.0 - t * t)
        tl.store(dst + cols, (g * scale).to(dst.dtype.element_ty), mask=mask)


@triton.jit
def _ce_stats_kernel(
    LOGITS,
    LABELS,
    ROW_MAX,
    SUM_EXP,
    Z_LABEL,
    Z_SUM,
    stride_row,
    n_cols,
    vocab_start,
    ignore_index,
    softcap,
    HAS_SOFTCAP: tl.constexpr,
    NEED_Z_SUM: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    label = tl.load(LABELS + row).to(tl.int64)
    row_max, sum_exp, z_sum = _row_stats(base, n_cols, softcap, HAS_SOFTCAP, NEED_Z_SUM, BLOCK_V)
    local = label - vocab_start
    owned = (label != ignore_index) & (local >= 0) & (local < n_cols)
    z_label = tl.load(base + tl.where(owned, local, 0)).to(tl.float32)
    if HAS_SOFTCAP:
        z_label = softcap * _tanh(z_label / softcap)
    tl.store(ROW_MAX + row, row_max)
    tl.store(SUM_EXP + row, sum_exp)
    tl.store(Z_LABEL + row, tl.where(owned, z_label, 0.0))
    tl.store(Z_SUM + row, z_sum)


@triton.jit
def _ce_grad_kernel(
    LOGITS,
    LABELS,
    LSE,
    SCALE,
    DLOGITS,
    stride_row,
    stride_drow,
    stride_scale,
    n_cols,
    vocab_start,
    vocab_size,
    ignore_index,
    softcap,
    label_smoothing,
    z_loss_weight,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    label = tl.load(LABELS + row).to(tl.int64)
    scale = tl.load(SCALE + row * stride_scale).to(tl.float32)
    scale = tl.where(label != ignore_index, scale, 0.0)
    _write_row_grad(
        LOGITS + row * stride_row,
        DLOGITS + row * stride_drow,
        n_cols,
        label - vocab_start,
        tl.load(LSE + row),
        scale,
        vocab_size,
        softcap,
        label_smoothing,
        z_loss_weight,
        HAS_SOFTCAP,
        BLOCK_V,
    )


@triton.jit
def _ce_fused_kernel(
    LOGITS,
    LABELS,
    SCALE,
    LOSS,
    LSE,
    stride_row,
    n_cols,
    ignore_index,
    softcap,
    label_smoothing,
    z_loss_weight,
    HAS_SOFTCAP: tl.constexpr,
    STORE_LSE: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """One row: statistics, loss, then ``scale * d loss / d logits`` written over the row."""
    row = tl.program_id(0).to(tl.int64)
    base = LOGITS + row * stride_row
    label = tl.load(LABELS + row).to(tl.int64)
    valid = label != ignore_index
    row_max, sum_exp, z_sum = _row_stats(base, n_cols, softcap, HAS_SOFTCAP, True, BLOCK_V)
    # The label logit is read here, before the gradient overwrites the row.
    z_label = tl.load(base + tl.where(valid, label, 0)).to(tl.float32)
    if HAS_SOFTCAP:
        z_label = softcap * _tanh(z_label / softcap)
    lse = row_max + tl.log(sum_exp)
    loss = (1.0 - label_smoothing) * (lse - z_label) + label_smoothing * (lse - z_sum / n_cols)
    loss += z_loss_weight * lse * lse
    tl.store(LOSS + row, tl.where(valid, loss, 0.0))
    if STORE_LSE:
        tl.store(LSE + row, lse)
    scale = tl.where(valid, tl.load(SCALE).to(tl.float32), 0.0)
    _write_row_grad(
        base,
        base,
        n_cols,
        label,
        lse,
        scale,
        n_cols,
        softcap,
        label_smoothing,
        z_loss_weight,
        HAS_SOFTCAP,
        BLOCK_V,
    )


# The fused kernel runs one program per row of a small chunk (256 rows at a 128k vocab): too few
# programs to keep HBM busy with 8 KiB loads, so each program loads 16 KiB per step with 16 warps.
_FUSED_BLOCK_V, _FUSED_WARPS = 8192, 16


def _block_v(n_cols: int) -> int:
    return min(triton.next_power_of_2(n_cols), 4096)


def _stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    softcap: float | None,
    need_z_sum: bool,
    vocab_start: int,
) -> tuple[torch.Tensor, ...]:
    n_rows, n_cols = logits.shape
    row_max, sum_exp, z_label, z_sum = (
        torch.empty(n_rows, dtype=torch.float32, device=logits.device) for _ in range(4)
    )
    _ce_stats_kernel[(n_rows,)](
        logits,
        labels,
        row_max,
        sum_exp,
        z_label,
        z_sum,
        logits.stride(0),
        n_cols,
        vocab_start,
        ignore_index,
        softcap if softcap is not None else 1.0,
        HAS_SOFTCAP=softcap is not None,
        NEED_Z_SUM=need_z_sum,
        BLOCK_V=_block_v(n_cols),
        num_warps=8,
    )
    return row_max, sum_exp, z_label, z_sum


def _loss_from_stats(
    stats: tuple[torch.Tensor, ...],
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss_weight: float,
    group: dist.ProcessGroup | None,
    vocab_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns per-token losses (0 at ignored tokens) and the logsumexp of each row."""
    row_max, sum_exp, z_label, z_sum = stats
    if group is not None:
        global_max = row_max.clone()
        dist.all_reduce(global_max, op=dist.ReduceOp.MAX, group=group)
        sum_exp = sum_exp * torch.exp(row_max - global_max)
        dist.all_reduce(sum_exp, group=group)
        dist.all_reduce(z_label, group=group)
        if label_smoothing:
            dist.all_reduce(z_sum, group=group)
        row_max = global_max
    lse = row_max + torch.log(sum_exp)
    loss = lse - z_label
    if label_smoothing:
        loss = (1 - label_smoothing) * loss + label_smoothing * (lse - z_sum / vocab_size)
    if z_loss_weight:
        loss = loss + z_loss_weight * lse.square()
    return torch.where(labels != ignore_index, loss, 0.0), lse


def _grad(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    scale: torch.Tensor,
    out: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss_weight: float,
    softcap: float | None,
    vocab_start: int,
    vocab_size: int,
) -> None:
    n_rows, n_cols = logits.shape
    _ce_grad_kernel[(n_rows,)](
        logits,
        labels,
        lse,
        scale,
        out,
        logits.stride(0),
        out.stride(0),
        scale.stride(0),
        n_cols,
        vocab_start,
        vocab_size,
        ignore_index,
        softcap if softcap is not None else 1.0,
        label_smoothing,
        z_loss_weight,
        HAS_SOFTCAP=softcap is not None,
        BLOCK_V=_block_v(n_cols),
        num_warps=8,
    )


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


class _CrossEntropy(torch.autograd.Function):
    """Per-token losses; backward recomputes the softmax from the saved logits and logsumexp."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any, logits: torch.Tensor, labels: torch.Tensor, opts: dict[str, Any]
    ) -> torch.Tensor:
        logits = _rows(logits)
        stats = _stats(
            logits, labels, opts["ignore_index"], opts["softcap"], bool(opts["label_smoothing"]), 0
        )
        loss, lse = _loss_from_stats(
            stats,
            labels,
            opts["ignore_index"],
            opts["label_smoothing"],
            opts["z_loss_weight"],
            None,
            logits.shape[1],
        )
        ctx.save_for_backward(logits, labels, lse)
        ctx.opts = opts
        return loss

    @staticmethod
    def backward(ctx: Any, d_loss: torch.Tensor) -> tuple[torch.Tensor | None, ...]:  # type: ignore[override]
        logits, labels, lse = ctx.saved_tensors
        opts = ctx.opts
        d_logits = torch.empty_like(logits)
        _grad(
            logits,
            labels,
            lse,
            d_loss,
            d_logits,
            opts["ignore_index"],
            opts["label_smoothing"],
            opts["z_loss_weight"],
            opts["softcap"],
            0,
            logits.shape[1],
        )
        return d_logits, None, None


def cross_entropy_triton(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss_weight: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns per-token fp32 losses ``[N]`` (0 at ignored tokens) and the label-token count."""
    labels = labels.contiguous()  # the kernels index labels by row
    opts = {
        "ignore_index": ignore_index,
        "label_smoothing": label_smoothing,
        "z_loss_weight": z_loss_weight,
        "softcap": softcap,
    }
    return _CrossEntropy.apply(logits, labels, opts), (labels != ignore_index).sum()


def ce_loss_and_grad_triton(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    scale: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss_weight: float,
    softcap: float | None,
    want_grad: bool,
    group: dist.ProcessGroup | None = None,
    vocab_start: int = 0,
    vocab_size: int | None = None,
    lse_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns per-token losses and ``scale * d loss / d logits`` written over ``logits`` in place.

    The same contract as ``automodel.kernels.cross_entropy.ce_loss_and_grad`` (``lse_out`` included)
    except that the gradient is scaled by the 0-d ``scale`` and lands in ``logits``' own storage and
    dtype (the caller owns that buffer: a chunk of logits computed for this call).
    """
    logits, labels = _rows(logits), labels.contiguous()
    if want_grad and group is None and logits.is_contiguous():
        # The whole vocab is here: one kernel reads each row for its statistics and rewrites it as
        # its gradient (the second read mostly hits L2).
        loss = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        _ce_fused_kernel[(logits.shape[0],)](
            logits,
            labels,
            scale.to(torch.float32),
            loss,
            lse_out if lse_out is not None else loss,
            logits.stride(0),
            logits.shape[1],
            ignore_index,
            softcap if softcap is not None else 1.0,
            label_smoothing,
            z_loss_weight,
            HAS_SOFTCAP=softcap is not None,
            STORE_LSE=lse_out is not None,
            BLOCK_V=min(triton.next_power_of_2(logits.shape[1]), _FUSED_BLOCK_V),
            num_warps=_FUSED_WARPS,
        )
        return loss, logits
    total_vocab = vocab_size if vocab_size is not None else logits.shape[1]
    stats = _stats(logits, labels, ignore_index, softcap, bool(label_smoothing), vocab_start)
    loss, lse = _loss_from_stats(
        stats, labels, ignore_index, label_smoothing, z_loss_weight, group, total_vocab
    )
    if lse_out is not None:
        lse_out.copy_(lse)
    if not want_grad:
        return loss, None
    grad = ce_grad_from_lse_triton(
        logits,
        labels,
        lse,
        scale=scale,
        ignore_index=ignore_index,
        label_smoothing=label_smoothing,
        z_loss_weight=z_loss_weight,
        softcap=softcap,
        vocab_start=vocab_start,
        vocab_size=total_vocab,
    )
    return loss, grad


def ce_grad_from_lse_triton(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    *,
    scale: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss_weight: float,
    softcap: float | None,
    vocab_start: int,
    vocab_size: int,
) -> torch.Tensor:
    """Returns ``logits`` overwritten by ``scale * d loss / d logits`` of its vocab slice.

    The Triton counterpart of ``automodel.kernels.cross_entropy.ce_grad_from_lse`` (rows of a
    ``vocab_size``-wide vocab restricted to ``[vocab_start, vocab_start + V_slice)``, with their
    full-row logsumexp ``lse``), scaled by the 0-d ``scale`` and written in place in ``logits``'
    dtype. ``logits`` rows must have a unit last stride.
    """
    if logits.stride(-1) != 1:
        raise ValueError(
            "ce_grad_from_lse_triton: logits must have a unit last stride (it is written in "
            "place); pass a contiguous block"
        )
    row_scale = scale.to(torch.float32).expand(logits.shape[0])
    _grad(
        logits,
        labels.contiguous(),
        lse,
        row_scale,
        logits,
        ignore_index,
        label_smoothing,
        z_loss_weight,
        softcap,
        vocab_start,
        vocab_size,
    )
    return logits
