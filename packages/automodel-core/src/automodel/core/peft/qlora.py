"""QLoRA: the adapted layers' base weights stored in 4-bit NF4 through bitsandbytes (CUDA only).

bitsandbytes is an optional dependency (``pip install 'automodel-core[qlora]'``), imported only
when ``LoraConfig(quantize_base="nf4")`` is used.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from automodel.core.peft.lora_linear import LoraLinear


def quantize_nf4(lora: LoraLinear) -> None:
    """Replaces ``lora.weight`` by its NF4 quantization on the GPU (double-quantized statistics).

    The adapter keeps the base weight's original dtype as its compute dtype; the base weight
    stays frozen. Raises ImportError without bitsandbytes and ValueError without CUDA.
    """
    bnb = _bitsandbytes()
    weight = lora.weight
    if weight.device.type == "meta":
        raise ValueError(
            "quantize_base='nf4' needs materialized base weights; load the model (not on the meta "
            "device) before apply_peft"
        )
    device = weight.device if weight.device.type == "cuda" else torch.device("cuda")
    quantized = bnb.nn.Params4bit(
        weight.detach().to("cpu"),
        requires_grad=False,
        quant_type="nf4",
        compress_statistics=True,
    ).to(device)
    lora.weight = quantized
    if lora.bias is not None:
        lora.bias = nn.Parameter(lora.bias.detach().to(device), requires_grad=False)
    for name in ("lora_A", "lora_B", "lora_magnitude_vector"):
        param = lora._parameters.get(name)
        if param is not None:
            setattr(lora, name, nn.Parameter(param.detach().to(device), requires_grad=True))
    lora._quantized = True


def nf4_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Returns ``x @ dequant(weight).T + bias`` with bitsandbytes' 4-bit matmul."""
    bnb = _bitsandbytes()
    return bnb.matmul_4bit(x, weight.t(), bias=bias, quant_state=weight.quant_state)  # type: ignore[attr-defined]


def nf4_dequantize(weight: torch.Tensor) -> torch.Tensor:
    """Returns the dense (compute-dtype) tensor of an NF4 ``Params4bit`` weight."""
    bnb = _bitsandbytes()
    return bnb.functional.dequantize_4bit(weight.data, weight.quant_state)  # type: ignore[attr-defined]


def _bitsandbytes() -> ModuleType:
    try:
        import bitsandbytes
    except ImportError as err:
        raise ImportError(
            "LoraConfig(quantize_base='nf4') (QLoRA) needs bitsandbytes: "
            "pip install 'automodel-core[qlora]', or drop quantize_base"
        ) from err
    if not torch.cuda.is_available():
        raise ValueError(
            "LoraConfig(quantize_base='nf4') (QLoRA) needs a CUDA GPU for bitsandbytes' 4-bit "
            "kernels; on CPU use plain LoRA (quantize_base=None)"
        )
    return bitsandbytes
