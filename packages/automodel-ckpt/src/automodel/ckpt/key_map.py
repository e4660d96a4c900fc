"""``KeyMap``: how in-memory state-dict keys map to the keys stored in a Hugging Face checkpoint.

Most models store exactly their ``state_dict()`` keys and need no key map. A model whose in-memory
layout differs from the files (renamed modules, a fused ``qkv_proj`` saved as ``q/k/v_proj``, a fused
``gate_up_proj`` saved as ``gate_proj``/``up_proj``, 3D MoE expert tensors saved per expert as
``experts.{i}.w1/w2/w3``) passes a ``KeyMap`` to ``save``/``load``.

The protocol has three methods; subclass ``KeyMap`` and override what you need:

- ``hf_name(name) -> str | None``: the checkpoint key of in-memory tensor ``name`` when it is a pure
  rename (the cheap path: sharded tensors are written and read slice by slice, never gathered), or
  ``None`` when the tensor is split or merged, in which case the two methods below are used.
- ``to_hf(name, tensor) -> [(hf_name, tensor), ...]``: on save, the checkpoint tensors made from
  the full (gathered, unsharded) in-memory tensor.
- ``from_hf(name, read) -> tensor``: on load, the full in-memory tensor built from checkpoint tensors
  fetched with ``read(hf_name)`` (each call returns one full checkpoint tensor). The result is then
  sliced to the rank's shard. Every key passed to ``read`` counts as consumed for ``strict`` checks.

A plain ``dict`` or callable ``name -> hf_name`` is accepted wherever a ``KeyMap`` is, as a rename.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

__all__ = ["KeyMap", "RenameKeys", "as_key_map"]


class KeyMap:
    """Identity mapping; subclass and override ``hf_name``/``to_hf``/``from_hf`` for other layouts.

    Example:
        >>> class FusedQKV(KeyMap):
        ...     def hf_name(self, name):
        ...         return None if name.endswith("qkv.weight") else name
        ...     def to_hf(self, name, tensor):
        ...         q, k, v = tensor.chunk(3)
        ...         base = name.removesuffix("qkv.weight")
        ...         return [(base + "q_proj.weight", q), (base + "k_proj.weight", k),
        ...                 (base + "v_proj.weight", v)]
        ...     def from_hf(self, name, read):
        ...         base = name.removesuffix("qkv.weight")
        ...         return torch.cat([read(base + p + "_proj.weight") for p in "qkv"])
        >>> FusedQKV().to_hf("attn.qkv.weight", torch.zeros(6, 2))[0][0]
        'attn.q_proj.weight'
    """

    def hf_name(self, name: str) -> str | None:
        """Returns the checkpoint key of ``name`` when it is a rename, else ``None`` (split/merge)."""
        return name

    def to_hf(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        """Returns the checkpoint (name, tensor) pairs made from the full in-memory ``tensor``."""
        raise NotImplementedError(
            f"{type(self).__name__}.hf_name({name!r}) returned None, so it must implement to_hf"
        )

    def from_hf(self, name: str, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        """Returns the full in-memory tensor ``name`` built from checkpoint tensors ``read(key)``."""
        raise NotImplementedError(
            f"{type(self).__name__}.hf_name({name!r}) returned None, so it must implement from_hf"
        )


class RenameKeys(KeyMap):
    """Renames keys with a dict (missing keys keep their name) or a callable ``name -> hf_name``.

    Example:
        >>> RenameKeys({"backbone.embed.weight": "model.embed_tokens.weight"}).hf_name("backbone.embed.weight")
        'model.embed_tokens.weight'
        >>> RenameKeys(lambda n: n.replace("backbone.", "model.")).hf_name("backbone.norm.weight")
        'model.norm.weight'
    """

    def __init__(self, rename: Mapping[str, str] | Callable[[str], str]) -> None:
        self._rename = rename

    def hf_name(self, name: str) -> str:
        if isinstance(self._rename, Mapping):
            return self._rename.get(name, name)
        return self._rename(name)


def as_key_map(key_map: KeyMap | Mapping[str, str] | Callable[[str], str] | None) -> KeyMap:
    """Returns ``key_map`` as a ``KeyMap`` (``None`` -> identity, dict/callable -> ``RenameKeys``)."""
    if key_map is None:
        return KeyMap()
    if isinstance(key_map, KeyMap):
        return key_map
    if isinstance(key_map, Mapping) or callable(key_map):
        return RenameKeys(key_map)
    raise TypeError(
        f"key_map must be a KeyMap, a dict or a callable name -> hf_name, got {type(key_map).__name__}"
    )
