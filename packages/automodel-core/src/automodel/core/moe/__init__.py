"""Mixture-of-experts support: grouped-GEMM experts for transformers' MoE blocks, load-balance stats."""

from automodel.core.moe.config import num_routed_experts
from automodel.core.moe.grouped_experts import (
    grouped_forward_matches,
    has_own_forward,
    is_experts_module,
    patch_moe_experts,
    use_grouped_forward,
)
from automodel.core.moe.load_stats import MoELoadStats, moe_load_stats
from automodel.core.moe.state_dict_adapter import MoEKeyMap, moe_key_map

__all__ = [
    "MoEKeyMap",
    "MoELoadStats",
    "grouped_forward_matches",
    "has_own_forward",
    "is_experts_module",
    "moe_key_map",
    "moe_load_stats",
    "num_routed_experts",
    "patch_moe_experts",
    "use_grouped_forward",
]
