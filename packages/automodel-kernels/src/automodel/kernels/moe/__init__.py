"""Mixture-of-experts building blocks: routing, token permutation, grouped GEMM, activation."""

from automodel.kernels.moe.activation import swiglu_packed
from automodel.kernels.moe.grouped_mm import grouped_mm
from automodel.kernels.moe.permute import permute, unpermute
from automodel.kernels.moe.routing import load_balance_loss, router_z_loss, topk_route

__all__ = [
    "grouped_mm",
    "load_balance_loss",
    "permute",
    "router_z_loss",
    "swiglu_packed",
    "topk_route",
    "unpermute",
]
