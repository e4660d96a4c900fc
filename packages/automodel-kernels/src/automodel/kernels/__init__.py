"""automodel.kernels — see packages/automodel-kernels/README.md."""

from automodel.kernels.activations import geglu, swiglu
from automodel.kernels.cross_entropy import cross_entropy
from automodel.kernels.linear_cross_entropy import linear_cross_entropy
from automodel.kernels.norm import add_rms_norm, rms_norm
from automodel.kernels.rope import ROPE_TYPES, apply_rotary, rope_cos_sin, rope_init

__version__ = "0.1.0"

__all__ = [
    "ROPE_TYPES",
    "__version__",
    "add_rms_norm",
    "apply_rotary",
    "cross_entropy",
    "geglu",
    "linear_cross_entropy",
    "rms_norm",
    "rope_cos_sin",
    "rope_init",
    "swiglu",
]
