"""lm_head + cross-entropy in token chunks: the full ``[tokens, vocab]`` logits never exist.

The forward pass walks the tokens in chunks; each chunk's logits are computed, turned into losses
and into their gradient, which is folded into the gradients of ``hidden``, ``weight`` and ``bias``
at once, and the chunk is freed. ``backward`` only scales the stored gradients by the incoming
gradient. Peak extra memory is one chunk of logits plus the gradients themselves.

The weight gradient is built one of two ways (``weight_grad``):

- ``"chunks"``: ``grad_w += dlogits.T @ hidden`` per token chunk (three matmuls per chunk). With a
  few hundred tokens per chunk this update is bound by reading and writing the whole ``grad_w``
  once per chunk (1 GB per chunk at a 128k x 2048 bf16 ``lm_head``), far more than its matmul.
- ``"vocab_blocks"``: the token chunks only produce the loss, each row's logsumexp and the hidden
  gradient; a second pass walks the vocab in blocks of rows, recomputes every token's logits for
  the block (in the same buffer: ``[tokens, rows]`` holds as many elements as one token chunk),
  turns them into their gradient from the stored logsumexp, and writes the block's ``grad_w`` rows
  once (``dlogits_block.T @ hidden``, a matmul over all tokens). One more matmul in all, but every
  matmul of the second pass is compute-bound, ``grad_w`` is written once, never read, and rounded
  to its dtype once instead of once per chunk.

Which is faster depends on the chunk (benchmarks/kernels_lce_h100_2026-11-28.md, H100, 8192 tokens x
128256 vocab): at 256 tokens per chunk (Liger-Kernel's chunk and memory) the per-chunk update takes
16.8 ms (1b) of a 34.6 ms step and ``"vocab_blocks"`` is 1.04x (1b) / 1.09x (8b) faster; at 512
tokens the update is nearly compute-bound and the extra matmul (~6 ms at 1b) costs more than it
saves. On an H200 (1.43x the H100's memory bandwidth) the per-chunk update is cheap enough that
``"vocab_blocks"`` at 256 tokens is ~6% slower than Liger (benchmarks/kernels_h200_2026-11-28.md):
``"auto"`` follows the H100 measurement.

A ``weight`` sharded on the vocab dim (a DTensor with ``Shard(0)`` on a 1-D mesh, as tensor
parallelism shards ``lm_head``) works too: each rank computes its vocab slice and the softmax
statistics are all-reduced over the mesh's group.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate, Shard

from automodel.kernels._backend import resolve_backend
from automodel.kernels.cross_entropy import _check_ce_args, ce_grad_from_lse, ce_loss_and_grad

__all__ = ["linear_cross_entropy"]

# Bytes of one chunk of logits (in the logits' dtype) the default chunk size aims for: 512 tokens of
# a 128k vocabulary in bf16, ~1.2x faster than Liger for 0.06 GiB more (H200, 8192 tokens,
# benchmarks/kernels_h200_*.md). 256 tokens match Liger's memory; there "vocab_blocks" is 1.03x /
# 1.06x Liger's speed (H100, 1b / 8b, benchmarks/kernels_lce_h100_2026-11-28.md).
_CHUNK_LOGITS_BYTES = 1 << 27
# weight_grad="auto" on CUDA picks "vocab_blocks" up to this many tokens per chunk, where the
# per-chunk update is bound by grad_w's read and write (measured faster at 256, slower at 512).
_VOCAB_BLOCKS_MAX_CHUNK = 256
WEIGHT_GRADS = ("chunks", "vocab_blocks")


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    label_smoothing: float = 0.0,
    z_loss_weight: float = 0.0,
    softcap: float | None = None,
    reduction: str = "mean",
    chunk_size: int | None = None,
    weight_grad: str = "auto",
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``cross_entropy(hidden @ weight.T + bias, labels)`` without materializing the logits.

    Same loss, count and semantics as :func:`automodel.kernels.cross_entropy` applied to the full
    logits (computed in ``hidden``'s dtype, then fp32 math), with exact gradients for ``hidden``,
    ``weight`` and ``bias``.

    Args:
        hidden: final hidden states ``[..., H]``.
        weight: ``lm_head`` weight ``[V, H]``; a plain tensor, or a DTensor that is replicated or
            sharded on dim 0 (vocab) over a 1-D mesh (tensor parallelism).
        labels: integer ``[...]`` (``hidden.shape[:-1]``), already aligned with ``hidden``.
        bias: optional ``[V]`` (sharded like ``weight`` if it is a DTensor).
        ignore_index: the label value that is skipped.
        label_smoothing: ``eps`` in ``[0, 1)``.
        z_loss_weight: weight of ``logsumexp**2`` per label token.
        softcap: logits become ``softcap * tanh(logits / softcap)`` first (Gemma 2).
        reduction: ``"mean"`` (over label tokens) or ``"sum"``.
        chunk_size: tokens per chunk; the default keeps one chunk of logits under 128 MiB (512
            tokens of a 128k vocabulary in bf16).
        weight_grad: how ``weight``'s gradient is built (module docstring): ``"chunks"`` (one
            pass, accumulated per token chunk), ``"vocab_blocks"`` (a second pass over vocab
            blocks, each row written once) or ``"auto"`` (on CUDA ``"vocab_blocks"`` for chunks
            of at most 256 tokens, else ``"chunks"``; ``"chunks"`` on the CPU). A vocab-sharded
            ``weight`` always uses ``"chunks"``.
        backend: ``"auto"`` (Triton on CUDA, else PyTorch), ``"torch"`` or ``"triton"``; selects the
            loss kernels, the matmuls are cuBLAS either way.

    Returns:
        ``loss`` (fp32, 0-d) and ``num_label_tokens`` (0-d int64, no host sync).

    Example:
        >>> h, w = torch.randn(2, 6, 16), torch.randn(50, 16)
        >>> labels = torch.randint(0, 50, (2, 6))
        >>> loss, n = linear_cross_entropy(h, w, labels)
        >>> int(n)
        12
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(
            f"linear_cross_entropy: reduction={reduction!r} is not supported; expected 'mean' or "
            "'sum' (per-token losses need the full logits: use cross_entropy for 'none')"
        )
    _check_ce_args(
        "linear_cross_entropy", hidden.shape[:-1], labels, label_smoothing, softcap, reduction
    )
    if hidden.shape[:-1] != labels.shape:
        raise ValueError(
            f"linear_cross_entropy: labels must have shape hidden.shape[:-1] = "
            f"{tuple(hidden.shape[:-1])}; got {tuple(labels.shape)}. Labels are aligned with "
            "hidden (shift them before calling)"
        )
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(
            f"linear_cross_entropy: weight must be [V, H] with H = hidden.shape[-1] = "
            f"{hidden.shape[-1]}; got {tuple(weight.shape)}. Pass lm_head.weight"
        )
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size must be >= 1 or None; got {chunk_size}")
    if weight_grad != "auto" and weight_grad not in WEIGHT_GRADS:
        raise ValueError(
            f"linear_cross_entropy: weight_grad={weight_grad!r} is not supported; expected 'auto' "
            f"or one of {list(WEIGHT_GRADS)}"
        )
    choice = resolve_backend("linear_cross_entropy", backend, hidden.device)

    vocab_size = weight.shape[0]
    hidden, labels = _local_replicated(hidden), _local_replicated(labels)
    weight_local, group, vocab_start = _local_vocab_shard(weight)
    bias_local = _local_vocab_shard(bias)[0] if bias is not None else None

    flat_hidden = hidden.reshape(-1, hidden.shape[-1])
    flat_labels = labels.reshape(-1)
    n_tokens = flat_hidden.shape[0]
    if chunk_size is None:
        chunk_size = _default_chunk_size(n_tokens, weight_local.shape[0], hidden.element_size())
    weight_grad = _resolve_weight_grad(weight_grad, hidden.device, chunk_size, n_tokens)
    loss, count = _ChunkedLinearCrossEntropy.apply(
        flat_hidden,
        weight_local,
        bias_local,
        flat_labels,
        {
            "ignore_index": ignore_index,
            "label_smoothing": label_smoothing,
            "z_loss_weight": z_loss_weight,
            "softcap": softcap,
            "mean": reduction == "mean",
            "chunk_size": chunk_size,
            "triton": choice == "triton",
            "group": group,
            "vocab_start": vocab_start,
            "vocab_size": vocab_size,
            # Vocab blocks need the whole vocab here (a sharded one takes the chunked path).
            "vocab_blocks": weight_grad == "vocab_blocks" and group is None,
        },
    )
    return loss, count


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Loss of the chunked lm_head + CE; gradients are computed in forward and scaled in backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        labels: torch.Tensor,
        opts: dict[str, Any],
    ) -> tuple[torch.Tensor, torch.Tensor]:
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        want_grad = want_h or want_w or want_b
        group = opts["group"]
        count = (labels != opts["ignore_index"]).sum()
        scale = 1.0 / count.clamp(min=1) if opts["mean"] else torch.ones((), device=labels.device)

        grad_h = torch.empty_like(hidden) if want_h else None
        vocab_blocks = want_w and opts["vocab_blocks"]
        # In the weight's dtype, like Liger: an fp32 accumulator would cost twice a bf16 weight.
        # The vocab-block pass writes every row once: no zeros needed.
        grad_w = (
            (torch.empty_like if vocab_blocks else torch.zeros_like)(weight) if want_w else None
        )
        # The chunks accumulate into grad_w only when the vocab-block pass does not build it.
        accumulate_w = grad_w if not vocab_blocks else None
        # Each token's logsumexp, for the vocab-block pass.
        lse = (
            torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
            if vocab_blocks
            else None
        )
        grad_b = (
            torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device)
            if want_b
            else None
        )
        # A running sum, not a [tokens] buffer: the vocab-block pass's logsumexp takes that room.
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        chunk_loss = _chunk_loss_triton if opts["triton"] else _chunk_loss_torch
        chunk = opts["chunk_size"]
        # One logits buffer for every chunk: the allocator never holds two chunks at once.
        buffer = hidden.new_empty(min(chunk, hidden.shape[0]), weight.shape[0])
        main = torch.cuda.current_stream(hidden.device) if hidden.is_cuda else None
        side = (
            _side_stream(hidden.device) if main is not None and accumulate_w is not None else None
        )
        for start in range(0, hidden.shape[0], chunk):
            if side is not None:
                main.wait_stream(side)  # type: ignore[union-attr]  # the last chunk's grad_w read the buffer
            h = hidden[start : start + chunk]
            logits = buffer[: h.shape[0]]
            torch.matmul(h, weight.T, out=logits)
            if bias is not None:
                logits.add_(bias)
            loss, dlogits = chunk_loss(
                logits,
                labels[start : start + chunk],
                scale=scale,
                ignore_index=opts["ignore_index"],
                label_smoothing=opts["label_smoothing"],
                z_loss_weight=opts["z_loss_weight"],
                softcap=opts["softcap"],
                want_grad=want_grad,
                group=group,
                vocab_start=opts["vocab_start"],
                vocab_size=opts["vocab_size"],
                lse_out=lse[start : start + h.shape[0]] if lse is not None else None,
            )
            total.add_(loss.sum())
            if dlogits is None:
                continue
            if accumulate_w is not None:
                # addmm accumulates in fp32 inside cuBLAS and rounds once per chunk. With few tokens
                # per chunk it is bound by reading and writing grad_w, so on CUDA it runs on a side
                # stream, beside the grad_h matmul that reads the same chunk.
                if side is not None:
                    side.wait_stream(main)  # type: ignore[arg-type]
                    with torch.cuda.stream(side):
                        accumulate_w.addmm_(dlogits.T, h)
                else:
                    accumulate_w.addmm_(dlogits.T, h)
            if grad_h is not None:
                torch.matmul(dlogits, weight, out=grad_h[start : start + chunk])
            if grad_b is not None:
                grad_b.add_(dlogits.sum(dim=0, dtype=torch.float32))
            del dlogits
        if side is not None:
            main.wait_stream(side)  # type: ignore[union-attr]  # before buffer and grad_w are used
        if grad_w is not None and lse is not None:
            _weight_grad_by_vocab_blocks(
                grad_w, hidden, weight, bias, labels, lse, scale, buffer, opts
            )
        del buffer
        if grad_h is not None and group is not None:
            # Each rank holds the contribution of its vocab slice.
            dist.all_reduce(grad_h, group=group)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.bias_dtype = bias.dtype if bias is not None else None
        ctx.triton = opts["triton"]
        ctx.backward_done = False
        ctx.mark_non_differentiable(count)
        return total * scale, count

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: Any, grad_loss: torch.Tensor, _grad_count: torch.Tensor | None
    ) -> tuple[torch.Tensor | None, ...]:
        if ctx.backward_done:
            raise RuntimeError(
                "linear_cross_entropy: backward ran twice through the same graph; its gradients "
                "are computed in forward and scaled in place, so run the forward again instead "
                "of retain_graph=True"
            )
        ctx.backward_done = True
        grad_h, grad_w, grad_b = ctx.saved_tensors
        # In place: the buffers were made for this call, and copies would double the peak memory.
        for grad in (grad_h, grad_w):
            if grad is not None:
                _scale_(grad, grad_loss, ctx.triton)
        if grad_b is not None:
            grad_b = (grad_b * grad_loss).to(ctx.bias_dtype)
        return grad_h, grad_w, grad_b, None, None


def _scale_(grad: torch.Tensor, grad_loss: torch.Tensor, triton: bool) -> None:
    """Multiplies ``grad`` in place by the upstream gradient ``grad_loss`` (0-d)."""
    if triton and grad.is_contiguous():
        # Skips the read and write of the whole gradient when grad_loss is 1, without a host sync.
        from automodel.kernels._triton.scale import scale_unless_one_

        scale_unless_one_(grad, grad_loss)
    else:
        grad.mul_(grad_loss.to(grad.dtype))


def _resolve_weight_grad(
    weight_grad: str, device: torch.device, chunk_size: int, n_tokens: int
) -> str:
    """Returns the schedule ``weight_grad="auto"`` stands for (anything else unchanged)."""
    if weight_grad != "auto":
        return weight_grad
    small_chunks = chunk_size <= _VOCAB_BLOCKS_MAX_CHUNK < n_tokens
    return "vocab_blocks" if device.type == "cuda" and small_chunks else "chunks"


def _weight_grad_by_vocab_blocks(
    grad_w: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: torch.Tensor,
    lse: torch.Tensor,
    scale: torch.Tensor,
    buffer: torch.Tensor,
    opts: dict[str, Any],
) -> None:
    """Writes ``grad_w`` block by block of vocab rows, recomputing every token's logits for each.

    A block of ``rows`` vocab rows takes ``[tokens, rows]`` logits, as many elements as ``buffer``
    (one token chunk) holds: ``logits = hidden @ weight[rows].T``, turned in place into ``scale *
    d loss / d logits`` from each token's logsumexp ``lse``, then ``grad_w[rows] = dlogits.T @
    hidden`` (a matmul over all tokens, written once).
    """
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    rows = max(1, buffer.numel() // n_tokens)
    flat = (
        buffer.view(-1) if rows * n_tokens <= buffer.numel() else hidden.new_empty(n_tokens * rows)
    )
    loss_args = {
        "ignore_index": opts["ignore_index"],
        "label_smoothing": opts["label_smoothing"],
        "z_loss_weight": opts["z_loss_weight"],
        "softcap": opts["softcap"],
        "vocab_size": vocab,
    }
    for first in range(0, vocab, rows):
        w = weight[first : first + rows]
        logits = flat[: n_tokens * w.shape[0]].view(n_tokens, w.shape[0])
        torch.matmul(hidden, w.T, out=logits)
        if bias is not None:
            logits.add_(bias[first : first + rows])
        if opts["triton"]:
            from automodel.kernels._triton.cross_entropy import ce_grad_from_lse_triton

            ce_grad_from_lse_triton(
                logits, labels, lse, scale=scale, vocab_start=first, **loss_args
            )
        else:
            grad = ce_grad_from_lse(logits, labels, lse, vocab_start=first, **loss_args)
            logits.copy_(grad.mul_(scale))
        torch.matmul(logits.T, hidden, out=grad_w[first : first + rows])


@functools.cache
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    """Returns one side stream per device, created once (cuBLAS keeps a workspace per stream)."""
    return torch.cuda.Stream(device)


def _chunk_loss_torch(
    logits: torch.Tensor, labels: torch.Tensor, *, scale: torch.Tensor, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Returns the chunk's per-token losses and ``scale * d loss / d logits`` in logits' dtype."""
    loss, grad = ce_loss_and_grad(logits, labels, **kwargs)
    if grad is None:
        return loss, None
    return loss, grad.mul_(scale).to(logits.dtype)


def _chunk_loss_triton(
    logits: torch.Tensor, labels: torch.Tensor, *, scale: torch.Tensor, **kwargs: Any
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """As ``_chunk_loss_torch``, from the Triton kernels, the gradient written over ``logits``."""
    from automodel.kernels._triton.cross_entropy import ce_loss_and_grad_triton

    return ce_loss_and_grad_triton(logits, labels, scale=scale, **kwargs)


def _default_chunk_size(n_tokens: int, vocab_local: int, element_size: int) -> int:
    """Returns a power-of-two token count whose logits stay under ``_CHUNK_LOGITS_BYTES``."""
    target = max(1, _CHUNK_LOGITS_BYTES // (element_size * max(vocab_local, 1)))
    chunk = 1 << (target.bit_length() - 1)
    return max(1, min(chunk, n_tokens))


def _local_replicated(t: torch.Tensor) -> torch.Tensor:
    """Returns the full tensor for a DTensor (gathered differentiably), else ``t`` itself."""
    if isinstance(t, DTensor):
        replicated = [Replicate()] * t.device_mesh.ndim
        return t.redistribute(t.device_mesh, replicated).to_local()
    return t


def _local_vocab_shard(
    t: torch.Tensor,
) -> tuple[torch.Tensor, dist.ProcessGroup | None, int]:
    """Returns ``(local tensor, process group, first vocab row)`` for a vocab-sharded DTensor."""
    if not isinstance(t, DTensor):
        return t, None, 0
    placements = t.placements
    if all(isinstance(p, Replicate) for p in placements):
        return t.to_local(), None, 0
    if t.device_mesh.ndim != 1 or not isinstance(placements[0], Shard) or placements[0].dim != 0:
        raise ValueError(
            "linear_cross_entropy: a DTensor weight must be replicated or sharded on dim 0 (vocab) "
            f"over a 1-D mesh; got placements {placements} on a {t.device_mesh.ndim}-D mesh. "
            "Pass the tensor-parallel lm_head weight (FSDP unshards it before forward)"
        )
    mesh = t.device_mesh
    # Shard(0) splits like torch.chunk: every rank but the last holds ceil(V / n) rows.
    rows_per_rank = -(-t.shape[0] // mesh.size())
    return t.to_local(), mesh.get_group(), mesh.get_local_rank() * rows_per_rank
