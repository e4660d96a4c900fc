"""HF <-> automodel state-dict conversion for the dense families.

The dense families keep transformers' parameter names and layouts (separate q/k/v and gate/up
projections: TP plans, PEFT target names and checkpoints all carry over unchanged), so the
conversion is a rename table that is empty today. A family that fuses tensors (qkv, gate_up, or
the MoE families of issue 8) subclasses this and overrides both directions; ``automodel.ckpt``
takes the same mapping as its ``key_map``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch


class StateDictAdapter:
    """Converts state dicts between the HF layout and automodel's, both ways.

    Example:
        >>> adapter = StateDictAdapter()
        >>> sd = {"model.norm.weight": torch.ones(2)}
        >>> adapter.from_hf(adapter.to_hf(sd)).keys() == sd.keys()
        True
    """

    renames: Mapping[str, str] = {}  # automodel name -> HF name

    def to_hf(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Returns ``state_dict`` with HF names (tensors shared, not copied)."""
        return {self.renames.get(k, k): v for k, v in state_dict.items()}

    def from_hf(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Returns an HF ``state_dict`` with automodel's names (tensors shared, not copied)."""
        inverse = {hf: ours for ours, hf in self.renames.items()}
        return {inverse.get(k, k): v for k, v in state_dict.items()}
