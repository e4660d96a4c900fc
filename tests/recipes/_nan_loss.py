"""A `_target_` loss for tests: token cross-entropy, except NaN on its third call (see reset)."""

from __future__ import annotations

import torch

from automodel.recipes._components import token_loss_sum

_calls = {"n": 0}


def nan_on_third_call(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Returns the summed cross-entropy, or NaN on the third call since :func:`reset`."""
    _calls["n"] += 1
    loss = token_loss_sum(logits, labels)
    return loss * float("nan") if _calls["n"] == 3 else loss


def reset() -> None:
    """Starts counting calls again (before each in-process run)."""
    _calls["n"] = 0
