"""Where a decoder model's parts live, and which of its blocks go to which pipeline stage.

A Hugging Face causal LM is ``<root>.lm_head`` over a body ``<root>.<body>`` (``model`` for every
decoder family) holding ``embed_tokens``, a ``layers`` ``nn.ModuleList``, a final ``norm`` and a
``rotary_emb``. ``find_decoder_layout`` finds that body by structure, so unseen models with the
same layout split too.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

from torch import nn

_PARTS = ("embed_tokens", "layers", "norm")


@dataclass(frozen=True)
class DecoderLayout:
    """The parts of a decoder model that pipeline stages are cut from.

    Attributes:
        body_name: attribute of the root holding the decoder body (``"model"``).
        body: the decoder body (owns ``embed_tokens``, ``layers``, ``norm``, ``rotary_emb``).
        head_name: attribute of the root holding the LM head (``"lm_head"``).
        head: the LM head.
        config: the model's config object (read for masks and logit softcapping), or None.
    """

    body_name: str
    body: nn.Module
    head_name: str
    head: nn.Module
    config: Any

    @property
    def layers(self) -> nn.ModuleList:
        """Returns the body's block list."""
        layers = self.body.layers
        assert isinstance(layers, nn.ModuleList)
        return layers

    def block_fqn(self, index: int) -> str:
        """Returns the fully qualified name of block ``index`` (``"model.layers.3"``)."""
        return f"{self.body_name}.layers.{index}"


def find_decoder_layout(model: nn.Module) -> DecoderLayout:
    """Returns where the embedding, blocks, norm, rotary embedding and head of ``model`` live.

    Args:
        model: a causal LM whose root has an ``lm_head`` and one direct child holding
            ``embed_tokens``, a ``layers`` ModuleList and a final ``norm``.

    Returns:
        The :class:`DecoderLayout` of ``model``.

    Raises:
        ValueError: the model does not have that layout.

    Example:
        >>> find_decoder_layout(llama).block_fqn(0)  # doctest: +SKIP
        'model.layers.0'
    """
    head = getattr(model, "lm_head", None)
    bodies = [
        (name, child)
        for name, child in model.named_children()
        if all(isinstance(getattr(child, part, None), nn.Module) for part in _PARTS)
        and isinstance(child.layers, nn.ModuleList)
    ]
    if not isinstance(head, nn.Module) or len(bodies) != 1:
        raise ValueError(
            f"pipeline parallelism cannot split {type(model).__name__}: expected a causal LM with "
            "an `lm_head` and one child module holding `embed_tokens`, a `layers` ModuleList and "
            "`norm` (the Hugging Face decoder layout). Fix: set pp=1 for this model."
        )
    body_name, body = bodies[0]
    return DecoderLayout(
        body_name=body_name,
        body=body,
        head_name="lm_head",
        head=head,
        config=getattr(model, "config", None),
    )


def balanced_split(num_layers: int, num_stages: int) -> list[list[int]]:
    """Returns the block indices of each stage: contiguous, sizes differing by at most one.

    The first and last stages also carry the embedding and the LM head, so when the blocks do not
    divide evenly, the extra blocks go to the middle stages first, then to the last, then to the
    first.

    Args:
        num_layers: number of blocks of the model.
        num_stages: number of pipeline stages (``pp * pp_virtual_stages``).

    Returns:
        ``num_stages`` lists of consecutive block indices covering ``range(num_layers)``.

    Raises:
        ValueError: fewer blocks than stages.

    Example:
        >>> balanced_split(6, 4)
        [[0], [1, 2], [3, 4], [5]]
    """
    if num_stages > num_layers:
        raise ValueError(
            f"pipeline has {num_stages} stages (pp * pp_virtual_stages) but the model has only "
            f"{num_layers} layers. Fix: choose pp * pp_virtual_stages <= {num_layers}."
        )
    base, extra = divmod(num_layers, num_stages)
    preference = [*range(1, num_stages - 1), num_stages - 1, 0] if num_stages > 1 else [0]
    sizes = [base] * num_stages
    for stage in preference[:extra]:
        sizes[stage] += 1
    out, start = [], 0
    for size in sizes:
        out.append(list(range(start, start + size)))
        start += size
    return out


def split_at(layout: DecoderLayout, split_points: list[str], num_stages: int) -> list[list[int]]:
    """Returns the block indices of each stage, given the FQNs of the blocks that start a stage.

    Args:
        layout: the model's layout (``find_decoder_layout``).
        split_points: ``num_stages - 1`` block FQNs in increasing order, e.g. ``["model.layers.8"]``.
        num_stages: number of pipeline stages.

    Returns:
        ``num_stages`` lists of consecutive block indices.

    Raises:
        ValueError: a wrong number of points, an unknown FQN, or points out of order.

    Example:
        >>> split_at(find_decoder_layout(llama4), ["model.layers.1"], 2)  # doctest: +SKIP
        [[0], [1, 2, 3]]
    """
    num_layers = len(layout.layers)
    names = {layout.block_fqn(i): i for i in range(num_layers)}
    if len(split_points) != num_stages - 1:
        raise ValueError(
            f"pp_split_points has {len(split_points)} entries but {num_stages} stages need "
            f"{num_stages - 1}. Fix: give one block FQN per stage boundary, e.g. "
            f"[{layout.block_fqn(num_layers // 2)!r}] for 2 stages."
        )
    starts = [0]
    for point in split_points:
        if point not in names:
            raise ValueError(
                f"pp_split_points entry {point!r} is not a block of the model. Fix: use FQNs "
                f"{layout.block_fqn(1)!r} ... {layout.block_fqn(num_layers - 1)!r}."
            )
        starts.append(names[point])
    starts.append(num_layers)
    if any(b <= a for a, b in itertools.pairwise(starts)):
        raise ValueError(
            f"pp_split_points {split_points} must be strictly increasing and leave every stage at "
            f"least one block (the first stage starts at {layout.block_fqn(0)!r}). Fix: reorder "
            "them or drop duplicates."
        )
    return [list(range(a, b)) for a, b in itertools.pairwise(starts)]
