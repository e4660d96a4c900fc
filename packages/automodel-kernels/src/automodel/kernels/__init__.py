"""automodel.kernels — see packages/automodel-kernels/README.md."""

from automodel.kernels.activations import geglu, swiglu
from automodel.kernels.attention import attention, hf_attention_forward
from automodel.kernels.cross_entropy import cross_entropy
from automodel.kernels.fp8 import convert_to_float8
from automodel.kernels.linear_cross_entropy import linear_cross_entropy
from automodel.kernels.moe import (
    grouped_mm,
    load_balance_loss,
    permute,
    router_z_loss,
    topk_route,
    unpermute,
)
from automodel.kernels.norm import add_rms_norm, rms_norm
from automodel.kernels.rope import ROPE_TYPES, apply_rotary, rope_cos_sin, rope_init
from automodel.kernels.te import convert_to_te, te_available, te_fp8_autocast

__version__ = "0.1.0"

__all__ = [
    "ROPE_TYPES",
    "__version__",
    "add_rms_norm",
    "apply_rotary",
    "attention",
    "convert_to_float8",
    "convert_to_te",
    "cross_entropy",
    "geglu",
    "grouped_mm",
    "hf_attention_forward",
    "linear_cross_entropy",
    "load_balance_loss",
    "permute",
    "rms_norm",
    "rope_cos_sin",
    "rope_init",
    "router_z_loss",
    "swiglu",
    "te_available",
    "te_fp8_autocast",
    "topk_route",
    "unpermute",
]
