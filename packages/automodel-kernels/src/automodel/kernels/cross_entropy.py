"""Cross-entropy over already-aligned labels, with fp32 math, z-loss, softcap and a label-token count.

The loss of one token with logits ``z`` (after the optional softcap ``c * tanh(z / c)``), label ``y``,
label smoothing ``eps`` over ``V`` classes and z-loss weight ``w`` is::

    lse = logsumexp(z)
    loss = (1 - eps) * (lse - z[y]) + eps * (lse - mean(z)) + w * lse**2

which is ``torch.nn.CrossEntropyLoss(label_smoothing=eps)`` plus PaLM's z-loss. Tokens whose label is
``ignore_index`` contribute nothing. The count of label tokens comes back as a 0-d int64 tensor (no
host sync), so callers can reduce with ``"sum"`` and normalize by a global count across gradient
accumulation steps and data-parallel ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from automodel.kernels._backend import resolve_backend

__all__ = ["cross_entropy"]

REDUCTIONS = ("mean", "sum", "none")


def cross_entropy(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss_weight: float = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(loss, num_label_tokens)`` for logits and labels that are already aligned.

    Labels are not shifted here: for causal LM training pass ``labels[..., 1:]`` against
    ``logits[..., :-1, :]`` (or shift the labels once in the data pipeline).

    Args:
        logits: ``[..., V]`` in any float dtype; the math runs in fp32.
        labels: integer ``[...]`` (``logits.shape[:-1]``); ``ignore_index`` marks tokens without loss.
        ignore_index: the label value that is skipped.
        label_smoothing: ``eps`` in ``[0, 1)``, as in ``torch.nn.CrossEntropyLoss``.
        z_loss_weight: weight of ``logsumexp(z)**2`` added per label token (0 disables it).
        softcap: when set, logits become ``softcap * tanh(logits / softcap)`` first (Gemma 2).
        reduction: ``"mean"`` (over label tokens; 0 when there are none), ``"sum"``, or ``"none"``
            (fp32 per-token losses shaped like ``labels``, 0 at ignored tokens).
        backend: ``"auto"`` (Triton on CUDA, else PyTorch), ``"torch"`` or ``"triton"``.

    Returns:
        ``loss`` (fp32) and ``num_label_tokens``, a 0-d int64 tensor on ``logits``' device.

    Example:
        >>> logits, labels = torch.randn(2, 5, 11), torch.randint(0, 11, (2, 5))
        >>> labels[0, 0] = -100
        >>> loss, n = cross_entropy(logits, labels)
        >>> int(n)
        9
    """
    _check_ce_args("cross_entropy", logits.shape[:-1], labels, label_smoothing, softcap, reduction)
    if logits.shape[:-1] != labels.shape:
        raise ValueError(
            f"cross_entropy: labels must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}; "
            f"got {tuple(labels.shape)}. Labels are aligned with logits (shift them before calling)"
        )
    flat_logits = logits.reshape(-1, logits.shape[-1])
    flat_labels = labels.reshape(-1)
    if resolve_backend("cross_entropy", backend, logits.device) == "triton":
        from automodel.kernels._triton.cross_entropy import cross_entropy_triton

        per_token, count = cross_entropy_triton(
            flat_logits, flat_labels, ignore_index, label_smoothing, z_loss_weight, softcap
        )
    else:
        per_token, count = _cross_entropy_torch(
            flat_logits, flat_labels, ignore_index, label_smoothing, z_loss_weight, softcap
        )
    return reduce_loss(per_token, count, reduction, labels.shape), count


def reduce_loss(
    per_token: torch.Tensor, count: torch.Tensor, reduction: str, shape: torch.Size
) -> torch.Tensor:
    """Returns the per-token losses reduced as asked (mean over label tokens, sum, or none)."""
    if reduction == "none":
        return per_token.view(shape)
    total = per_token.sum()
    if reduction == "sum":
        return total
    return total / count.clamp(min=1)


def _cross_entropy_torch(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    z_loss_weight: float,
    softcap: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: per-token fp32 losses (0 at ignored tokens) and the label-token count."""
    z = logits.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    per_token = F.cross_entropy(
        z, labels, ignore_index=ignore_index, reduction="none", label_smoothing=label_smoothing
    )
    valid = labels != ignore_index
    if z_loss_weight:
        lse = torch.logsumexp(z, dim=-1)
        per_token = per_token + z_loss_weight * torch.where(valid, lse.square(), 0.0)
    return per_token, valid.sum()


def ce_loss_and_grad(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
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
    """Returns per-token fp32 losses ``[N]`` and, if asked, their fp32 gradient w.r.t. ``logits``.

    The closed-form loss and gradient of the module docstring, without autograd, for chunked and
    fused callers. With ``group``, ``logits`` holds the vocab slice ``[vocab_start, vocab_start +
    V_local)`` of a vocab sharded over ``group`` (``vocab_size`` in total): the max, the sum of
    exponentials, the label logit and the logit sum are all-reduced, and the gradient returned is
    this rank's slice. ``lse_out`` (fp32 ``[N]``), when given, receives each row's logsumexp.
    """
    z, tanh = _capped(logits, softcap)
    v_local = z.shape[-1]
    v_total = vocab_size if vocab_size is not None else v_local
    row_max = z.amax(dim=-1)
    if group is not None:
        dist.all_reduce(row_max, op=dist.ReduceOp.MAX, group=group)
    exp = torch.exp(z - row_max[:, None])
    sum_exp = exp.sum(dim=-1)
    if group is not None:
        dist.all_reduce(sum_exp, group=group)
    lse = row_max + torch.log(sum_exp)
    if lse_out is not None:
        lse_out.copy_(lse)
    valid, owned, index = _label_columns(labels, ignore_index, vocab_start, v_local)
    z_label = torch.where(owned, z.gather(1, index[:, None]).squeeze(1), 0.0)
    if group is not None:
        dist.all_reduce(z_label, group=group)
    loss = lse - z_label
    if label_smoothing:
        z_sum = z.sum(dim=-1)
        if group is not None:
            dist.all_reduce(z_sum, group=group)
        loss = (1 - label_smoothing) * loss + label_smoothing * (lse - z_sum / v_total)
    if z_loss_weight:
        loss = loss + z_loss_weight * lse.square()
    loss = torch.where(valid, loss, 0.0)
    if not want_grad:
        return loss, None
    grad = exp.div_(sum_exp[:, None])
    _softmax_to_grad(grad, lse, tanh, valid, owned, index, label_smoothing, z_loss_weight, v_total)
    return loss, grad


def ce_grad_from_lse(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    *,
    ignore_index: int,
    label_smoothing: float,
    z_loss_weight: float,
    softcap: float | None,
    vocab_start: int,
    vocab_size: int,
) -> torch.Tensor:
    """Returns the fp32 ``d loss / d logits`` of a vocab slice, given each row's logsumexp.

    ``logits`` ``[N, V_slice]`` holds the columns ``[vocab_start, vocab_start + V_slice)`` of a
    ``vocab_size``-wide vocab whose full-row logsumexp (after the softcap) is ``lse`` ``[N]``: the
    gradient of the module docstring's loss restricted to these columns, zero at ignored tokens.
    """
    z, tanh = _capped(logits, softcap)
    valid, owned, index = _label_columns(labels, ignore_index, vocab_start, z.shape[-1])
    grad = torch.exp(z - lse[:, None])
    _softmax_to_grad(
        grad, lse, tanh, valid, owned, index, label_smoothing, z_loss_weight, vocab_size
    )
    return grad


def _capped(
    logits: torch.Tensor, softcap: float | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns the fp32 logits after the softcap, and ``tanh(z / softcap)`` (None without one)."""
    z = logits.float()
    if softcap is None:
        return z, None
    tanh = torch.tanh(z / softcap)
    return softcap * tanh, tanh


def _label_columns(
    labels: torch.Tensor, ignore_index: int, vocab_start: int, v_local: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(valid, owned, index)`` of each row's label in a vocab slice.

    ``valid``: the label is not ``ignore_index``; ``owned``: it falls in ``[vocab_start,
    vocab_start + v_local)``; ``index``: its column in the slice (0 where not owned).
    """
    valid = labels != ignore_index
    local = labels - vocab_start
    owned = valid & (local >= 0) & (local < v_local)
    return valid, owned, torch.where(owned, local, 0)


def _softmax_to_grad(
    grad: torch.Tensor,
    lse: torch.Tensor,
    tanh: torch.Tensor | None,
    valid: torch.Tensor,
    owned: torch.Tensor,
    index: torch.Tensor,
    label_smoothing: float,
    z_loss_weight: float,
    vocab_size: int,
) -> None:
    """Turns the softmax ``grad`` into ``d loss / d logits`` in place."""
    # d/dz: softmax * (1 + 2 w lse) - eps / V - (1 - eps) * onehot(y), zero at ignored tokens.
    if z_loss_weight:
        grad.mul_((1 + 2 * z_loss_weight * lse)[:, None])
    if label_smoothing:
        grad.sub_(label_smoothing / vocab_size)
    grad.scatter_add_(1, index[:, None], torch.where(owned, -(1 - label_smoothing), 0.0)[:, None])
    grad.mul_(valid[:, None])
    if tanh is not None:
        grad.mul_(1 - tanh.square())


def _check_ce_args(
    op: str,
    token_shape: torch.Size,
    labels: torch.Tensor,
    label_smoothing: float,
    softcap: float | None,
    reduction: str,
) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(
            f"{op}: reduction={reduction!r} is not supported; expected one of {list(REDUCTIONS)}"
        )
    if not 0.0 <= label_smoothing < 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1); got {label_smoothing}")
    if softcap is not None and softcap <= 0:
        raise ValueError(f"{op}: softcap must be positive or None; got {softcap}")
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(
            f"{op}: labels must be an integer tensor (class indices); got {labels.dtype}"
        )
