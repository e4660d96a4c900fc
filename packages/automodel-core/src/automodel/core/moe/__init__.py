"""Mixture-of-experts support: grouped-GEMM experts for transformers' MoE blocks, load-balance stats."""

from automodel.core.moe.grouped_experts import is_experts_module, patch_moe_experts
from automodel.core.moe.load_stats import MoELoadStats, moe_load_stats

__all__ = ["MoELoadStats", "is_experts_module", "moe_load_stats", "patch_moe_experts"]
