"""The kernel ops the model code calls: automodel.kernels where an op has landed, plain torch else.

Every optimized model goes through this one module, so switching an op to automodel.kernels (or
back, to bisect a numerical difference) is a one-line change here. The torch fallbacks below are
exact references with the kernels' agreed signatures and semantics (HF layouts, fp32 math).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

try:  # the kernels package is written in parallel; use each op as soon as it exists
    from automodel import kernels as _k
except ImportError:  # pragma: no cover - automodel-kernels is a hard dependency
    _k = None  # type: ignore[assignment]


def _kernel(name: str) -> Any:
    return getattr(_k, name, None) if _k is not None else None


def _backend(op: str, requested: str = "auto") -> str:
    """Returns the backend for ``op``: an explicit argument, else ``set_backends``, else auto."""
    return requested if requested != "auto" else _BACKENDS.get(op, "auto")


# ----------------------------------------------------------------------------------------- norm
def rms_norm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, *, offset: float = 0.0, backend: str = "auto"
) -> torch.Tensor:
    """Returns RMSNorm(x) * (offset + weight), with HF's casting (Llama: offset 0, Gemma: 1)."""
    op = _kernel("rms_norm")
    if op is not None:
        return op(x, weight, eps, offset=offset, backend=_backend("rms_norm", backend))
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if offset == 0.0:  # LlamaRMSNorm: cast to the input dtype, then scale
        return weight * normed.to(x.dtype)
    return (normed * (offset + weight.float())).to(x.dtype)  # Gemma: scale in fp32, then cast


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    *,
    offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual): the residual add fused into the norm."""
    if x.dtype != residual.dtype:
        # Under autocast (e.g. Trainer's bf16=True) block outputs are bf16 while the residual
        # stream stays fp32; transformers' `residual + x` promotes, so do the same.
        dtype = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(dtype), residual.to(dtype)
    op = _kernel("add_rms_norm")
    if op is not None:
        return op(x, residual, weight, eps, offset=offset, backend=_backend("rms_norm"))
    total = x + residual
    return rms_norm(total, weight, eps, offset=offset), total


# ----------------------------------------------------------------------------------------- rope
def rope_init(
    rope_parameters: Mapping[str, Any],
    head_dim: int,
    *,
    max_position_embeddings: int | None = None,
    partial_rotary_factor: float = 1.0,
) -> tuple[torch.Tensor, float]:
    """Returns (inv_freq fp32 [rot_dim / 2], attention_scaling) for a transformers rope config."""
    op = _kernel("rope_init")
    if op is not None:
        return op(
            rope_parameters,
            head_dim,
            max_position_embeddings=max_position_embeddings,
            partial_rotary_factor=partial_rotary_factor,
        )
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type != "default":
        raise NotImplementedError(
            f"rope_type={rope_type!r} needs automodel.kernels.rope_init, which has not landed yet"
        )
    dim = int(head_dim * partial_rotary_factor)
    base = float(rope_parameters["rope_theta"])
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    return inv_freq, 1.0


def rope_cos_sin(
    inv_freq: torch.Tensor,
    position_ids: torch.Tensor,
    *,
    attention_scaling: float,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (cos, sin) [B, S, rot_dim] exactly as transformers' RotaryEmbedding.forward."""
    op = _kernel("rope_cos_sin")
    if op is not None:
        return op(inv_freq, position_ids, attention_scaling=attention_scaling, dtype=dtype)
    freqs = position_ids[..., None].float() * inv_freq.float().to(position_ids.device)
    emb = torch.cat((freqs, freqs), dim=-1)
    return (emb.cos() * attention_scaling).to(dtype), (emb.sin() * attention_scaling).to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (q, k) rotated (rotate-half convention; partial when cos is narrower than D)."""
    op = _kernel("apply_rotary")
    if op is not None:
        return op(q, k, cos, sin, backend=_backend("apply_rotary"))
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot = cos.shape[-1]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        out = x_rot * cos + _rotate_half(x_rot) * sin
        return torch.cat((out, x_pass), dim=-1) if x_pass.shape[-1] else out

    return rotate(q), rotate(k)


# ------------------------------------------------------------------------------------------ mlp
def gated_activation(gate: torch.Tensor, up: torch.Tensor, activation: str) -> torch.Tensor:
    """Returns act(gate) * up for ``activation`` "silu" (SwiGLU) or "gelu_tanh"/"gelu" (GeGLU)."""
    if activation == "silu":
        op = _kernel("swiglu")
        return op(gate, up, backend=_backend("swiglu")) if op is not None else F.silu(gate) * up
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    op = _kernel("geglu")
    if op is not None:
        return op(gate, up, approximate=approximate, backend=_backend("geglu"))
    return F.gelu(gate, approximate=approximate) * up


# ------------------------------------------------------------------------------------ attention
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int | None = None,
    document_ids: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
    softcap: float | None = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Returns causal attention [B, Hq, Sq, D] (bottom-right aligned, HF sliding-window rule).

    q is ``[B, Hq, Sq, D]``, k and v ``[B, Hkv, Sk, D]`` (any strides).
    """
    op = _kernel("attention")
    if op is not None:
        return op(
            q,
            k,
            v,
            causal=True,
            window=window,
            document_ids=document_ids,
            key_padding_mask=key_padding_mask,
            scale=scale,
            softcap=softcap,
            backend=_backend("attention", backend),
        )
    sq, sk = q.shape[-2], k.shape[-2]
    q_pos = torch.arange(sk - sq, sk, device=q.device)[:, None]
    k_pos = torch.arange(sk, device=q.device)[None, :]
    mask = (k_pos <= q_pos)[None, None]
    if window is not None:
        mask = mask & (k_pos > q_pos - window)[None, None]
    if document_ids is not None:
        mask = mask & (document_ids[:, None, -sq:, None] == document_ids[:, None, None, :])
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :].bool()
    # A query that may see nothing (left padding) attends uniformly, as HF's additive masks do,
    # instead of producing NaN that would poison gradients through masked-out positions.
    mask = mask | ~mask.any(-1, keepdim=True)
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if softcap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


# ----------------------------------------------------------------------------------------- loss
def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    ignore_index: int = -100,
    softcap: float | None = None,
    reduction: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss, number of label tokens) of cross_entropy(hidden @ weight.T, labels)."""
    op = _kernel("linear_cross_entropy")
    if op is not None:
        return op(
            hidden,
            weight,
            labels,
            bias=bias,
            ignore_index=ignore_index,
            softcap=softcap,
            reduction=reduction,
            backend=_backend("linear_cross_entropy"),
        )
    logits = F.linear(hidden, weight, bias).float()
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    loss = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction=reduction)
    return loss, (labels != ignore_index).sum()


__all__: list[str] = []


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100, reduction: str = "mean"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (loss, number of label tokens) of fp32 cross-entropy over aligned labels."""
    op = _kernel("cross_entropy")
    if op is not None:
        return op(
            logits,
            labels,
            ignore_index=ignore_index,
            reduction=reduction,
            backend=_backend("cross_entropy"),
        )
    loss = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction=reduction)
    return loss, (labels != ignore_index).sum()


_BACKENDS: dict[str, str] = {}
_OPS = ("rms_norm", "apply_rotary", "swiglu", "geglu", "attention", "cross_entropy")


def set_backends(backends: dict[str, str]) -> None:
    """Sets the backend each named op uses from now on, process-wide (``kernels={op: backend}``).

    Raises:
        ValueError: an op name automodel's models do not call.
    """
    unknown = sorted(set(backends) - set(_OPS) - {"linear_cross_entropy"})
    if unknown:
        raise ValueError(f"kernels: unknown op(s) {unknown}; expected some of {sorted(_OPS)}")
    _BACKENDS.update(backends)
