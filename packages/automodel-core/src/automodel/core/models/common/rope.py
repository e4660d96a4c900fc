"""Rotary tables (inv_freq) for every transformers rope_type, one per distinct layer rope config."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from automodel.core import _ops


def _inv_freq(config: Any, rope_parameters: dict[str, Any], head_dim: int, layer_type: str | None):
    try:
        return _ops.rope_init(
            rope_parameters,
            head_dim,
            max_position_embeddings=getattr(config, "max_position_embeddings", None),
            partial_rotary_factor=float(rope_parameters.get("partial_rotary_factor", 1.0)),
        )
    except NotImplementedError:
        # Until automodel.kernels.rope_init lands, scaled rope types come from transformers itself.
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

        fn = ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]]
        kwargs = {"layer_type": layer_type} if layer_type is not None else {}
        inv_freq, scaling = fn(config, None, **kwargs)
        return inv_freq.float(), float(scaling)


class RotaryTables(nn.Module):
    """Holds one ``inv_freq`` buffer per rope variant (``"default"`` or per layer type, Gemma 3).

    ``forward(position_ids, variant, dtype)`` returns (cos, sin) [B, S, rot_dim] as transformers'
    RotaryEmbedding does. Buffers are non-persistent: checkpoints never carry them.
    """

    def __init__(self, config: Any, head_dim: int, variants: dict[str, str | None]) -> None:
        super().__init__()
        self.scaling: dict[str, float] = {}
        for variant, layer_type in variants.items():
            params = config.rope_parameters
            if layer_type is not None:
                params = params[layer_type]
            inv_freq, scaling = _inv_freq(config, dict(params), head_dim, layer_type)
            self.register_buffer(f"inv_freq_{variant}", inv_freq, persistent=False)
            self.scaling[variant] = scaling
        self._variants = dict(variants)
        self._config = config
        self._head_dim = head_dim

    def reset_parameters(self) -> None:
        """Recomputes the tables (after a meta-device build, buffers hold no data)."""
        for variant, layer_type in self._variants.items():
            params = self._config.rope_parameters
            if layer_type is not None:
                params = params[layer_type]
            inv_freq, _ = _inv_freq(self._config, dict(params), self._head_dim, layer_type)
            buf = getattr(self, f"inv_freq_{variant}")
            if buf.device.type == "meta":
                setattr(self, f"inv_freq_{variant}", inv_freq)
            else:
                with torch.no_grad():
                    buf.copy_(inv_freq)

    def forward(
        self, position_ids: torch.Tensor, variant: str, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return _ops.rope_cos_sin(
            getattr(self, f"inv_freq_{variant}"),
            position_ids,
            attention_scaling=self.scaling[variant],
            dtype=dtype,
        )
