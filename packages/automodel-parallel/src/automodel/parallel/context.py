"""Context parallelism: sequences sharded over the ``cp`` mesh dim, attention as ring attention.

``context_parallel`` wraps torch's experimental context-parallel support
(``torch.distributed.tensor.experimental.context_parallel``): inside it, every
``F.scaled_dot_product_attention`` call runs as ring attention over the ``cp`` ranks, and the given
buffers (input ids, labels, position ids) are sharded in place along their sequence dim.

Causal attention makes early positions cheap and late ones expensive, so a plain split would leave
the last rank with most of the work. With ``load_balance=True`` (the default) the sequence is cut
into ``2 * cp`` chunks and rank ``r`` keeps chunks ``r`` and ``2 * cp - 1 - r`` ("head-tail"), which
gives every rank the same number of causal (query, key) pairs. ``load_balanced_indices`` spells the
layout out and ``shard_sequence`` / ``unshard_sequence`` apply it to any tensor, e.g. to shard
labels or per-token weights computed outside the context.

Three things a causal-LM training step must do under CP, all handled by ``causal_lm_buffers``:
shift the labels *before* sharding (a rank's shard is not contiguous, so shifting inside it would
pair tokens with the wrong targets), pass explicit global position ids (the model would otherwise
count positions from 0 on every rank), and divide the summed loss by the global token count.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.distributed.device_mesh import DeviceMesh

IGNORE_INDEX = -100

__all__ = [
    "causal_lm_buffers",
    "context_parallel",
    "load_balanced_indices",
    "shard_sequence",
    "unshard_sequence",
]


def load_balanced_indices(seq_len: int, cp: int, *, load_balance: bool = True) -> torch.Tensor:
    """Returns ``[cp, seq_len // cp]``: row ``r`` lists the global positions rank ``r`` keeps.

    Args:
        seq_len: global sequence length; a multiple of ``2 * cp`` (``cp`` without load balancing).
        cp: context-parallel degree.
        load_balance: head-tail layout (rank ``r`` keeps chunks ``r`` and ``2cp-1-r`` of
            ``2cp``); False gives contiguous chunks.

    Raises:
        ValueError: ``seq_len`` is not a multiple of ``2 * cp`` (or ``cp``).

    Example:
        >>> load_balanced_indices(8, 2).tolist()
        [[0, 1, 6, 7], [2, 3, 4, 5]]
    """
    chunks = 2 * cp if load_balance else cp
    if seq_len % chunks != 0:
        raise ValueError(
            f"context parallelism with cp={cp} needs the sequence length to be a multiple of "
            f"{chunks}{' (2 * cp, load-balanced)' if load_balance else ''}, got {seq_len}. "
            f"Fix: pad sequences to a multiple of {chunks}."
        )
    positions = torch.arange(seq_len).view(chunks, seq_len // chunks)
    if not load_balance:
        return positions
    return torch.cat([positions[:cp], positions[cp:].flip(0)], dim=1)


def shard_sequence(
    tensor: torch.Tensor, cp_rank: int, cp: int, *, seq_dim: int = 1, load_balance: bool = True
) -> torch.Tensor:
    """Returns the part of ``tensor`` along ``seq_dim`` that rank ``cp_rank`` keeps under CP.

    Example:
        >>> shard_sequence(torch.arange(8)[None], 1, 2).tolist()
        [[2, 3, 4, 5]]
    """
    index = load_balanced_indices(tensor.shape[seq_dim], cp, load_balance=load_balance)[cp_rank]
    return tensor.index_select(seq_dim, index.to(tensor.device))


def unshard_sequence(
    shards: list[torch.Tensor], *, seq_dim: int = 1, load_balance: bool = True
) -> torch.Tensor:
    """Returns the full tensor from every rank's shard (in rank order): the inverse of sharding.

    Example:
        >>> full = torch.arange(8)[None]
        >>> unshard_sequence([shard_sequence(full, r, 2) for r in range(2)]).tolist()
        [[0, 1, 2, 3, 4, 5, 6, 7]]
    """
    cp = len(shards)
    gathered = torch.cat(shards, dim=seq_dim)
    index = load_balanced_indices(gathered.shape[seq_dim], cp, load_balance=load_balance)
    restore = torch.argsort(index.reshape(-1)).to(gathered.device)
    return gathered.index_select(seq_dim, restore)


def causal_lm_buffers(
    input_ids: torch.Tensor, labels: torch.Tensor
) -> tuple[dict[str, torch.Tensor], int]:
    """Returns the full-length tensors a causal-LM step shards under CP, and the label count.

    Args:
        input_ids: ``[B, T]`` token ids.
        labels: ``[B, T]`` unshifted labels, ``-100`` where no loss is taken.

    Returns:
        ``({"input_ids", "position_ids", "shift_labels"}, num_label_tokens)``: position ids
        ``0..T-1`` per row and labels already shifted (position ``t`` predicts ``shift_labels[t]``),
        all ``[B, T]`` and fresh tensors (safe to shard in place); the loss of a rank is its summed
        token cross-entropy divided by ``num_label_tokens``, summed over ``cp`` ranks.

    Example:
        >>> buffers, n = causal_lm_buffers(torch.tensor([[5, 6, 7]]), torch.tensor([[5, 6, 7]]))
        >>> buffers["shift_labels"].tolist(), buffers["position_ids"].tolist(), n
        ([[6, 7, -100]], [[0, 1, 2]], 2)
    """
    batch, seq_len = input_ids.shape
    shifted = torch.cat([labels[:, 1:], labels.new_full((batch, 1), IGNORE_INDEX)], dim=1)
    positions = torch.arange(seq_len, device=input_ids.device).expand(batch, seq_len)
    buffers = {
        "input_ids": input_ids.clone(),
        "position_ids": positions.clone(),
        "shift_labels": shifted,
    }
    return buffers, int((shifted != IGNORE_INDEX).sum())


@contextmanager
def context_parallel(
    mesh: DeviceMesh,
    *,
    buffers: list[torch.Tensor],
    seq_dims: list[int] | None = None,
    no_restore: set[torch.Tensor] | None = None,
    load_balance: bool = True,
    rotate_method: str = "allgather",
) -> Iterator[None]:
    """Returns a context in which SDPA is ring attention over ``cp`` and ``buffers`` are sharded.

    On entry each buffer is replaced in place by this rank's shard along its sequence dim (the
    layout of :func:`load_balanced_indices`); on exit buffers are restored unless listed in
    ``no_restore``. Run forward *and* backward inside. Attention must be causal SDPA without an
    explicit mask (``is_causal=True``), as Hugging Face models call it with
    ``attn_implementation="sdpa"`` and an all-ones 2D ``attention_mask`` (which also stops
    transformers from mistaking the jumping position ids for packed sequences). Needs CUDA: torch
    implements ring attention for the flash, efficient and cuDNN SDPA kernels only.

    Args:
        mesh: a DeviceMesh with a ``"cp"`` dim, or a 1D mesh used as the CP group.
        buffers: tensors with a sequence dim (e.g. the values of :func:`causal_lm_buffers`);
            no parameters.
        seq_dims: the sequence dim of each buffer (default 1 for all).
        no_restore: buffers not to restore on exit (saves a copy).
        load_balance: head-tail layout (needed for causal attention to balance work).
        rotate_method: how ring attention moves K/V shards: ``"allgather"`` or ``"alltoall"``.

    Raises:
        ValueError: a sequence length that ``2 * cp`` does not divide, mismatched ``seq_dims``,
            a mesh without a ``cp`` dim, or an unknown ``rotate_method``.

    Example:
        >>> buffers, n_tokens = causal_lm_buffers(input_ids, labels)  # doctest: +SKIP
        >>> with context_parallel(mesh, buffers=list(buffers.values())):  # doctest: +SKIP
        ...     logits = model(input_ids=buffers["input_ids"], position_ids=buffers["position_ids"],
        ...                    attention_mask=torch.ones_like(buffers["input_ids"])).logits
        ...     loss = F.cross_entropy(logits.flatten(0, 1).float(),
        ...                            buffers["shift_labels"].flatten(), reduction="sum") / n_tokens
        ...     loss.backward()
    """
    from torch.distributed.tensor.experimental import context_parallel as torch_context_parallel
    from torch.distributed.tensor.experimental._attention import _cp_options, set_rotate_method

    cp_mesh = _cp_submesh(mesh)
    cp = cp_mesh.size()
    seq_dims = [1] * len(buffers) if seq_dims is None else list(seq_dims)
    if len(seq_dims) != len(buffers):
        raise ValueError(
            f"context_parallel got {len(buffers)} buffers but {len(seq_dims)} seq_dims. "
            "Fix: give one sequence dim per buffer (or none for dim 1 everywhere)."
        )
    for buffer, dim in zip(buffers, seq_dims):
        load_balanced_indices(buffer.shape[dim], cp, load_balance=load_balance)  # validates
    if rotate_method not in ("allgather", "alltoall"):
        raise ValueError(
            f"context_parallel rotate_method={rotate_method!r}: expected 'allgather' or 'alltoall'."
        )
    previous_balance = _cp_options.enable_load_balance
    previous_rotate = _cp_options.rotate_method
    _cp_options.enable_load_balance = load_balance
    set_rotate_method(rotate_method)
    try:
        with torch_context_parallel(
            cp_mesh, buffers=buffers, buffer_seq_dims=seq_dims, no_restore_buffers=no_restore
        ):
            yield
    finally:
        _cp_options.enable_load_balance = previous_balance
        _cp_options.rotate_method = previous_rotate


def _cp_submesh(mesh: DeviceMesh) -> DeviceMesh:
    """Returns the 1D ``cp`` mesh of ``mesh``."""
    # Flattened dims (build_mesh's "ep", "dp"...) are not in mesh_dim_names but index fine.
    try:
        return mesh["cp"]
    except KeyError:
        if mesh.ndim == 1:
            return mesh
    names = mesh.mesh_dim_names or ()
    raise ValueError(
        f"context_parallel needs a mesh with a 'cp' dim or a 1D mesh; got dims {names}. "
        "Fix: build the mesh with build_mesh(config) or pass mesh['cp']."
    )
