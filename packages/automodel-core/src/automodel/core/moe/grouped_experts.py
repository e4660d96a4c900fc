"""Grouped-GEMM forward for transformers' fused MoE expert modules (Mixtral, Qwen3-MoE, ...).

transformers 5 holds the experts of a MoE block as one module with 3D parameters
``gate_up_proj`` ``[E, 2I, H]`` and ``down_proj`` ``[E, H, I]`` and a forward
``(hidden [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]`` that loops over the experts
hit. This module swaps that forward for: permute the token copies by expert, one grouped GEMM for
gate/up, the fused gated activation, one grouped GEMM for down, and a weighted unpermute — no Python
loop over experts on the GPU. Parameters, their names and the on-disk layout stay untouched, so
checkpoints, ``save_pretrained``, PEFT and expert parallelism see the same module.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from torch import nn

from automodel.kernels import grouped_mm, permute, swiglu, unpermute


def is_experts_module(module: nn.Module) -> bool:
    """Returns True for a fused experts module: 3D ``gate_up_proj`` and ``down_proj`` parameters."""
    gate_up = getattr(module, "gate_up_proj", None)
    down = getattr(module, "down_proj", None)
    return (
        isinstance(gate_up, torch.Tensor)
        and isinstance(down, torch.Tensor)
        and gate_up.dim() == 3
        and down.dim() == 3
        and gate_up.shape[0] == down.shape[0]
        and gate_up.shape[1] == 2 * down.shape[2]
        and not hasattr(
            module, "gate_up_proj_bias"
        )  # biased experts (gpt-oss) keep their own forward
    )


def _is_silu(act: Any) -> bool:
    return isinstance(act, nn.SiLU) or type(act).__name__ in ("SiLUActivation", "SiLU")


def _grouped_forward(
    self: Any,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    num_experts = int(self.gate_up_proj.shape[0])
    permuted, row_map, tokens_per_expert = permute(hidden_states, top_k_index, num_experts)
    gate_up = grouped_mm(permuted, self.gate_up_proj.transpose(1, 2), tokens_per_expert)
    gate, up = gate_up.chunk(2, dim=-1)
    act = swiglu(gate, up) if _is_silu(self.act_fn) else self.act_fn(gate) * up
    out = grouped_mm(act, self.down_proj.transpose(1, 2), tokens_per_expert)
    # Kept on device (no sync) for moe_load_stats; detached so it never holds the graph.
    self._automodel_tokens_per_expert = tokens_per_expert.detach()
    return unpermute(out, row_map, top_k_weights.to(out.dtype)).to(hidden_states.dtype)


def patch_moe_experts(model: nn.Module) -> list[str]:
    """Returns the FQNs of the expert modules whose forward now runs as grouped GEMMs.

    Recognizes modules by structure (see :func:`is_experts_module`), so MoE families transformers adds
    later work too. Idempotent. The math equals the per-expert loop (same products, summed in a
    fixed order); ``automodel.kernels.grouped_mm`` uses ``torch._grouped_mm`` on Hopper GPUs.

    Example:
        >>> model = transformers.AutoModelForCausalLM.from_pretrained(mixtral_path)
        >>> patch_moe_experts(model)
        ['model.layers.0.mlp.experts', 'model.layers.1.mlp.experts']
    """
    patched = []
    for name, module in model.named_modules():
        if not is_experts_module(module):
            continue
        if not getattr(module, "_automodel_grouped", False):
            module.forward = types.MethodType(_grouped_forward, module)  # type: ignore[method-assign]
            module._automodel_grouped = True
        patched.append(name)
    return patched
