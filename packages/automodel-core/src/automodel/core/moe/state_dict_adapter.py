"""Key map between transformers' in-memory MoE layout and the per-expert Hugging Face checkpoint layout.

In memory (transformers 5, automodel): ``...mlp.experts.gate_up_proj`` ``[E, 2I, H]`` and
``...mlp.experts.down_proj`` ``[E, H, I]``, router ``...mlp.gate.weight``.
On disk (the Hub's checkpoints, vLLM, older transformers):

- Mixtral: ``...block_sparse_moe.experts.{e}.w1.weight`` (gate), ``w3`` (up), ``w2`` (down) and
  ``...block_sparse_moe.gate.weight``;
- Qwen3-MoE and the DeepSeek-style layout: ``...mlp.experts.{e}.gate_proj.weight``, ``up_proj``,
  ``down_proj``.

``MoEKeyMap`` implements ``automodel.ckpt.KeyMap``, so ``automodel.ckpt.save`` writes the per-expert
layout from any layout in memory (plain, FSDP2, expert-parallel DTensors), and ``load`` reads it back.
"""

from __future__ import annotations

import re
from collections.abc import Callable

import torch

from automodel.ckpt import KeyMap

_FUSED = re.compile(r"^(?P<prefix>.*\.)mlp\.experts\.(?P<param>gate_up_proj|down_proj)$")

# model_type -> (MoE block name on disk, gate, up, down per-expert names)
_LAYOUTS: dict[str, tuple[str, str, str, str]] = {
    "mixtral": ("block_sparse_moe", "w1", "w3", "w2"),
}
_DEFAULT_LAYOUT = ("mlp", "gate_proj", "up_proj", "down_proj")


class MoEKeyMap(KeyMap):
    """Splits fused expert tensors into per-expert checkpoint tensors on save, and merges them on load.

    Args:
        model_type: ``config.model_type`` (``"mixtral"`` picks its ``w1/w2/w3`` names; any other
            uses ``gate_proj/up_proj/down_proj``).
        num_experts: experts per MoE layer.

    Example:
        >>> from automodel.ckpt import save
        >>> save(model, "out/", key_map=MoEKeyMap("qwen3_moe", model.config.num_experts))
    """

    def __init__(self, model_type: str, num_experts: int) -> None:
        self.block, self.gate, self.up, self.down = _LAYOUTS.get(model_type, _DEFAULT_LAYOUT)
        self.num_experts = num_experts

    def _rename_block(self, name: str) -> str:
        return name.replace(".mlp.", f".{self.block}.", 1) if self.block != "mlp" else name

    def hf_name(self, name: str) -> str | None:
        if _FUSED.match(name):
            return None
        if re.search(r"\.mlp\.gate\.weight$", name):
            return self._rename_block(name)
        return name

    def expert_module(self, experts_fqn: str, expert: int, proj: str) -> str:
        """Returns the Hub's per-expert module name of ``proj`` (``"gate"``, ``"up"``, ``"down"``).

        Example:
            >>> MoEKeyMap("mixtral", 8).expert_module("model.layers.0.mlp.experts", 3, "gate")
            'model.layers.0.block_sparse_moe.experts.3.w1'
        """
        names = {"gate": self.gate, "up": self.up, "down": self.down}
        if proj not in names:
            raise ValueError(f"expert_module: proj={proj!r}; expected one of {sorted(names)}")
        if experts_fqn == "mlp.experts" or experts_fqn.endswith(".mlp.experts"):
            prefix = experts_fqn[: -len("mlp.experts")]
            return f"{prefix}{self.block}.experts.{expert}.{names[proj]}"
        return f"{experts_fqn}.{expert}.{names[proj]}"

    def _expert_key(self, prefix: str, expert: int, proj: str) -> str:
        return f"{prefix}{self.block}.experts.{expert}.{proj}.weight"

    def to_hf(self, name: str, tensor: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
        match = _FUSED.match(name)
        assert match is not None, name
        prefix, param = match["prefix"], match["param"]
        out = []
        for e in range(tensor.shape[0]):
            if param == "gate_up_proj":
                gate, up = tensor[e].chunk(2, dim=0)
                out.append((self._expert_key(prefix, e, self.gate), gate.contiguous()))
                out.append((self._expert_key(prefix, e, self.up), up.contiguous()))
            else:
                out.append((self._expert_key(prefix, e, self.down), tensor[e].contiguous()))
        return out

    def from_hf(self, name: str, read: Callable[[str], torch.Tensor]) -> torch.Tensor:
        match = _FUSED.match(name)
        assert match is not None, name
        prefix, param = match["prefix"], match["param"]
        experts = range(self.num_experts)
        if param == "gate_up_proj":
            return torch.stack(
                [
                    torch.cat(
                        [
                            read(self._expert_key(prefix, e, self.gate)),
                            read(self._expert_key(prefix, e, self.up)),
                        ]
                    )
                    for e in experts
                ]
            )
        return torch.stack([read(self._expert_key(prefix, e, self.down)) for e in experts])


def moe_key_map(config: object) -> MoEKeyMap | None:
    """Returns the key map for a transformers config with MoE experts, or None for dense models."""
    num_experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if not num_experts:
        return None
    return MoEKeyMap(str(getattr(config, "model_type", "")), int(num_experts))
