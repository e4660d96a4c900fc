"""Model FLOPs per token and MFU, by the one convention of benchmarks/ (BENCHMARKS.md)."""

from __future__ import annotations

from typing import Any

import torch

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "B200": 2250.0}
"""Dense bf16 peak TFLOP/s per GPU name fragment."""


def flops_per_token(model: Any, seq_len: int) -> float:
    """Returns training FLOPs per token: ``6 * matmul_params + 12 * layers * hidden * seq_len``.

    Derivation: each matmul parameter costs 2 FLOPs per token forward (multiply + add) and 4
    backward (grads of inputs and of weights): 6 per parameter. Matmul parameters are the weights
    of every ``nn.Linear`` (lm_head included); the input embedding is a lookup, so it counts only
    when tied to the lm_head (then it *is* the lm_head's matmul, already counted as a Linear
    weight). Attention scores and the weighted sum add ``2 * 2 * seq_len * hidden`` FLOPs per
    token per layer forward, x3 with backward: ``12 * layers * hidden * seq_len``, with no causal
    discount. Activation recomputation is not counted (MFU counts useful work only).
    """
    matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    config = getattr(model, "config", None)
    text = getattr(config, "text_config", None) or config
    layers = int(getattr(text, "num_hidden_layers", 0) or 0)
    heads = int(getattr(text, "num_attention_heads", 0) or 0)
    head_dim = getattr(text, "head_dim", None) or (
        int(getattr(text, "hidden_size", 0)) // max(heads, 1)
    )
    attn_width = heads * int(head_dim)  # = hidden for most models; the width attention runs at
    return 6.0 * matmul + 12.0 * layers * attn_width * seq_len


def peak_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """Returns the device's dense bf16 peak FLOP/s (None on CPU or an unknown GPU)."""
    if override_tflops is not None:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None
