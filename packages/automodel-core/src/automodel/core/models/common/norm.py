"""RMSNorm with HF parameter names (``weight``), Llama or Gemma flavour, on automodel.kernels."""

from __future__ import annotations

import torch
from torch import nn

from automodel.core import _ops


class RMSNorm(nn.Module):
    """RMSNorm returning ``normalize(x) * (offset + weight)``; offset 1.0 is Gemma's ``(1 + w)``.

    Llama-style (offset 0) initializes the weight to ones, Gemma-style (offset 1) to zeros, as
    transformers does, so ``from_config`` models start as the identity scale.
    """

    def __init__(self, dim: int, eps: float = 1e-6, *, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(dim) if offset else torch.ones(dim))
        self.eps = eps
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _ops.rms_norm(x, self.weight, self.eps, offset=self.offset)

    def reset_parameters(self) -> None:
        nn.init.constant_(self.weight, 0.0 if self.offset else 1.0)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.eps}, offset={self.offset}"
