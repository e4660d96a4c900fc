"""Mixture-of-experts building blocks: routing, token permutation and grouped GEMM."""

from automodel.kernels.moe.grouped_mm import grouped_mm
from automodel.kernels.moe.permute import permute, unpermute
from automodel.kernels.moe.routing import load_balance_loss, router_z_loss, topk_route

__all__ = [
    "grouped_mm",
    "load_balance_loss",
    "permute",
    "router_z_loss",
    "topk_route",
    "unpermute",
]
