"""Which keys each query may see: one mask definition shared by every attention backend.

The rule for query ``i`` (of ``Sq``) and key ``j`` (of ``Sk``) in batch row ``b``, with the query's
absolute position ``p = i + (Sk - Sq)`` (queries are the last ``Sq`` of the ``Sk`` positions, as
when decoding with a KV cache: the causal diagonal is bottom-right aligned):

- causal: ``j <= p``;
- window ``W`` (transformers' ``sliding_window_overlay``): ``j > p - W``, so a query sees itself and
  the ``W - 1`` positions before it;
- documents (packed sequences): ``document_ids[b, p] == document_ids[b, j]``;
- key padding: ``key_padding_mask[b, j]`` (True = a real token).

The same predicate runs element-wise under FlexAttention's vmap and broadcast over index grids to
materialize a dense boolean mask for SDPA and the eager reference, so the backends cannot disagree
on what is masked.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MaskSpec:
    """The attention pattern of one call: what :func:`mask_mod` and :func:`dense` evaluate."""

    q_len: int
    kv_len: int
    causal: bool = True
    window: int | None = None
    document_ids: torch.Tensor | None = None  # [B, kv_len] int
    key_padding_mask: torch.Tensor | None = None  # [B, kv_len] bool

    @property
    def offset(self) -> int:
        """Returns the absolute position of query 0 (``kv_len - q_len``)."""
        return self.kv_len - self.q_len

    @property
    def needs_mask(self) -> bool:
        """Returns True when some key must be hidden from some query."""
        if self.document_ids is not None or self.key_padding_mask is not None:
            return True
        if self.window is not None and self.window < self.kv_len:
            return True
        # A causal mask hides nothing when a single query sits at the last position.
        return self.causal and self.q_len > 1

    @property
    def is_top_left_causal(self) -> bool:
        """Returns True when SDPA's ``is_causal=True`` (top-left aligned) is exactly this pattern."""
        plain = self.document_ids is None and self.key_padding_mask is None
        no_window = self.window is None or self.window >= self.kv_len
        return plain and no_window and self.causal and self.q_len == self.kv_len

    @property
    def batch_dependent(self) -> bool:
        """Returns True when the mask differs between batch rows."""
        return self.document_ids is not None or self.key_padding_mask is not None

    def mask_mod(
        self, b: torch.Tensor, h: torch.Tensor, q_idx: torch.Tensor, kv_idx: torch.Tensor
    ) -> torch.Tensor:
        """Returns True where query ``q_idx`` may attend to key ``kv_idx`` (FlexAttention's signature)."""
        del h  # the pattern is the same for every head
        return allowed(
            b,
            q_idx,
            kv_idx,
            offset=self.offset,
            causal=self.causal,
            window=self.window,
            document_ids=self.document_ids,
            key_padding_mask=self.key_padding_mask,
        )

    def dense(self, device: torch.device) -> torch.Tensor:
        """Returns the boolean mask ``[B or 1, 1, q_len, kv_len]`` (True = attend)."""
        batch = 1
        for t in (self.document_ids, self.key_padding_mask):
            if t is not None:
                batch = t.shape[0]
        b = torch.arange(batch, device=device).view(-1, 1, 1, 1)
        h = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=device)
        q_idx = torch.arange(self.q_len, device=device).view(1, 1, -1, 1)
        kv_idx = torch.arange(self.kv_len, device=device).view(1, 1, 1, -1)
        return self.mask_mod(b, h, q_idx, kv_idx).expand(batch, 1, self.q_len, self.kv_len)


def document_ids_from_cu_seqlens(cu_seqlens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Returns ``document_ids`` ``[1, seq_len]`` for flash-attn style ``cu_seqlens`` offsets.

    Token ``t`` belongs to document ``d`` when ``cu_seqlens[d] <= t < cu_seqlens[d + 1]``; tokens at
    or past ``cu_seqlens[-1]`` (trailing padding) form one more document of their own.

    Example:
        >>> document_ids_from_cu_seqlens(torch.tensor([0, 2, 5]), 6)
        tensor([[0, 0, 1, 1, 1, 2]])
    """
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(
            f"cu_seqlens must be 1-D offsets [num_docs + 1] starting at 0, got shape "
            f"{tuple(cu_seqlens.shape)}; build it as torch.cumsum of the document lengths with a 0 "
            "prepended"
        )
    positions = torch.arange(seq_len, device=cu_seqlens.device, dtype=cu_seqlens.dtype)
    ids = torch.searchsorted(cu_seqlens[1:].contiguous(), positions, right=True)
    return ids.unsqueeze(0)


def document_ids_from_position_ids(position_ids: torch.Tensor) -> torch.Tensor:
    """Returns ``document_ids`` ``[B, S]``: a new document starts wherever positions do not step by 1.

    This is how transformers detects packed sequences (``find_packed_sequence_indices``).

    Example:
        >>> document_ids_from_position_ids(torch.tensor([[0, 1, 2, 0, 1, 0]]))
        tensor([[0, 0, 0, 1, 1, 2]])
    """
    starts = torch.ones_like(position_ids, dtype=torch.long)
    starts[:, 1:] = (position_ids[:, 1:] - position_ids[:, :-1] != 1).long()
    return torch.cumsum(starts, dim=1) - 1


def varlen_layout(
    spec: MaskSpec, batch: int, seq: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Returns ``(keep, cu_seqlens, max_len)``: the varlen ("thd") form of a self-attention pattern.

    The batch is flattened to ``batch * seq`` tokens; ``keep`` indexes the tokens that stay (key
    padding is dropped); every contiguous run of kept tokens of one document of one row becomes one
    sequence, delimited by ``cu_seqlens`` (int32, ``[num_sequences + 1]``); ``max_len`` is the
    longest (a host sync: the varlen kernels take it as a number).

    Example:
        >>> spec = MaskSpec(4, 4, document_ids=torch.tensor([[0, 0, 1, 1]]))
        >>> keep, cu, max_len = varlen_layout(spec, 1, 4, torch.device("cpu"))
        >>> cu.tolist(), max_len
        ([0, 2, 4], 2)
    """
    segments = _segment_ids(spec, batch, seq, device)  # [B*S], -1 = dropped padding
    keep = torch.nonzero(segments >= 0).squeeze(1)
    kept = segments[keep]
    starts = torch.ones_like(kept, dtype=torch.bool)
    starts[1:] = kept[1:] != kept[:-1]
    start_idx = torch.nonzero(starts).squeeze(1)
    cu = torch.cat([start_idx, start_idx.new_tensor([kept.numel()])]).to(torch.int32)
    return keep, cu, int((cu[1:] - cu[:-1]).max())


def run_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    spec: MaskSpec,
    kernel: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor],
) -> torch.Tensor:
    """Returns ``[B, Hq, S, D]`` from a varlen kernel run on the packed form of ``q``, ``k``, ``v``.

    The tokens of :func:`varlen_layout` are gathered into ``[T, H, D]`` tensors and passed with
    ``cu_seqlens`` and ``max_len`` to ``kernel``, whose ``[T, Hq, D]`` (or ``[T, Hq * D]``) output is
    scattered back; dropped padding positions output zeros.
    """
    batch, n_q, seq, head_dim = q.shape
    keep, cu, max_len = varlen_layout(spec, batch, seq, q.device)
    flat = [t.transpose(1, 2).reshape(batch * seq, t.shape[1], head_dim)[keep] for t in (q, k, v)]
    out = kernel(flat[0], flat[1], flat[2], cu, max_len)
    full = out.new_zeros(batch * seq, n_q, head_dim)
    full[keep] = out.view(-1, n_q, head_dim)
    return full.view(batch, seq, n_q, head_dim).transpose(1, 2)


def _segment_ids(spec: MaskSpec, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """Returns one id per flattened token: equal ids = same sequence; -1 = a padding token to drop."""
    docs = (
        spec.document_ids
        if spec.document_ids is not None
        else torch.zeros(batch, seq, dtype=torch.long, device=device)
    ).long()
    docs = docs.expand(batch, seq)
    # Make ids unique across batch rows, so a document never continues into the next row.
    span = docs.max(dim=1, keepdim=True).values - docs.min(dim=1, keepdim=True).values + 1
    row_base = torch.cumsum(span, dim=0) - span
    ids = docs - docs.min(dim=1, keepdim=True).values + row_base
    if spec.key_padding_mask is not None:
        ids = torch.where(spec.key_padding_mask.expand(batch, seq), ids, -1)
    return ids.reshape(-1)


def allowed(
    b: torch.Tensor,
    q_idx: torch.Tensor,
    kv_idx: torch.Tensor,
    *,
    offset: int,
    causal: bool,
    window: int | None,
    document_ids: torch.Tensor | None,
    key_padding_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Returns True where query ``q_idx`` may see key ``kv_idx`` (the rule in this module's docstring)."""
    pos = q_idx + offset
    ok = torch.ones_like(pos - kv_idx, dtype=torch.bool)
    if causal:
        ok = ok & (kv_idx <= pos)
    if window is not None:
        ok = ok & (kv_idx > pos - window)
    if document_ids is not None:
        ok = ok & (document_ids[b, pos] == document_ids[b, kv_idx])
    if key_padding_mask is not None:
        ok = ok & key_padding_mask[b, kv_idx]
    return ok
