"""Gated MLP (SwiGLU / GeGLU) with HF parameter names: gate_proj, up_proj, down_proj."""

from __future__ import annotations

import torch
from torch import nn

from automodel.core import _ops


class GatedMLP(nn.Module):
    """Returns ``down_proj(act(gate_proj(x)) * up_proj(x))`` through the fused gated activation."""

    def __init__(self, hidden: int, intermediate: int, *, activation: str, bias: bool) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(
            _ops.gated_activation(self.gate_proj(x), self.up_proj(x), self.activation)
        )
