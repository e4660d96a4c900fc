"""Rotary position embeddings: frequency tables for every transformers ``rope_type`` and the apply.

``rope_init`` reproduces transformers' ``ROPE_INIT_FUNCTIONS`` (and the models' default init) from a
``config.rope_parameters`` mapping, without needing a config object; ``rope_cos_sin`` reproduces
``<Model>RotaryEmbedding.forward``; ``apply_rotary`` reproduces ``apply_rotary_pos_emb`` (rotate-half
convention), including partial rotary (Phi-3 style: the first ``rot_dim`` dims rotate).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from automodel.kernels._backend import resolve_backend

__all__ = ["ROPE_TYPES", "apply_rotary", "rope_cos_sin", "rope_init"]

ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "longrope", "llama3")


def rope_init(
    rope_parameters: Mapping[str, Any],
    head_dim: int,
    *,
    max_position_embeddings: int | None = None,
    partial_rotary_factor: float = 1.0,
    seq_len: int | torch.Tensor | None = None,
    device: torch.device | str | None = None,
) -> tuple[torch.Tensor, float]:
    """Returns ``(inv_freq, attention_scaling)`` for a transformers ``rope_parameters`` mapping.

    Values equal transformers' ``ROPE_INIT_FUNCTIONS[rope_type](config)`` (bit for bit in fp32).

    Args:
        rope_parameters: ``config.rope_parameters`` of a transformers 5 config: ``rope_type``
            (default ``"default"``), ``rope_theta`` and the type's keys (``factor``,
            ``original_max_position_embeddings``, ``low_freq_factor``, ``high_freq_factor``,
            ``beta_fast``, ``beta_slow``, ``mscale``, ``mscale_all_dim``, ``attention_factor``,
            ``truncate``, ``short_factor``, ``long_factor``, ``partial_rotary_factor``).
        head_dim: the attention head dimension.
        max_position_embeddings: ``config.max_position_embeddings``; needed by ``dynamic``, and by
            ``yarn``/``longrope`` when ``factor`` is absent.
        partial_rotary_factor: fraction of ``head_dim`` that rotates, used when
            ``rope_parameters`` has no ``partial_rotary_factor`` key.
        seq_len: the current sequence length for the length-dependent types (``dynamic`` grows the
            base beyond ``max_position_embeddings``; ``longrope`` uses ``long_factor`` beyond
            ``original_max_position_embeddings``); ignored by the others. A 0-d tensor (what
            transformers' dynamic update passes: ``position_ids.max() + 1``) makes ``dynamic`` do
            its base arithmetic in fp32 tensors, exactly as transformers does then.
        device: where to build ``inv_freq``.

    Returns:
        ``inv_freq``: fp32 ``[rot_dim // 2]`` with ``rot_dim = int(head_dim * partial_rotary_factor)``;
        ``attention_scaling``: the factor transformers multiplies cos and sin by.

    Example:
        >>> inv_freq, scale = rope_init({"rope_type": "default", "rope_theta": 10000.0}, 64)
        >>> inv_freq.shape, scale
        (torch.Size([32]), 1.0)
    """
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type not in ROPE_TYPES:
        raise ValueError(
            f"rope_init: rope_parameters['rope_type']={rope_type!r} is not supported; expected one "
            f"of {list(ROPE_TYPES)}"
        )
    if "rope_theta" not in rope_parameters:
        raise ValueError(
            "rope_init: rope_parameters has no 'rope_theta'; pass config.rope_parameters of a "
            "transformers 5 config (it always carries rope_theta)"
        )
    factor_key = rope_parameters.get("partial_rotary_factor")
    partial = float(factor_key) if factor_key is not None else partial_rotary_factor
    base = rope_parameters["rope_theta"]
    dim = int(head_dim * partial)
    p = rope_parameters
    exponents = (
        torch.arange(0, dim, 2, dtype=torch.int64).to(device=device, dtype=torch.float) / dim
    )

    if rope_type == "default":
        return 1.0 / (base**exponents), 1.0
    if rope_type == "linear":
        inv_freq = 1.0 / (base**exponents)
        inv_freq /= _require(p, "factor", rope_type)
        return inv_freq, 1.0
    if rope_type == "dynamic":
        max_pos = _require_max_pos(max_position_embeddings, rope_type)
        factor = _require(p, "factor", rope_type)
        length: int | torch.Tensor
        if seq_len is None:
            length = max_pos
        elif isinstance(seq_len, torch.Tensor):
            length = torch.clamp(seq_len, min=max_pos)
        else:
            length = max(seq_len, max_pos)
        base = base * ((factor * length / max_pos) - (factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (base**exponents), 1.0
    if rope_type == "llama3":
        return _llama3(p, base, exponents), 1.0
    if rope_type == "yarn":
        return _yarn(p, base, dim, exponents, max_position_embeddings)
    return _longrope(p, base, exponents, max_position_embeddings, seq_len, device)


def rope_cos_sin(
    inv_freq: torch.Tensor,
    position_ids: torch.Tensor,
    *,
    attention_scaling: float = 1.0,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(cos, sin)`` of shape ``[B, S, rot_dim]``, as transformers' RotaryEmbedding returns.

    Args:
        inv_freq: ``[rot_dim // 2]`` from :func:`rope_init`.
        position_ids: integer positions ``[B, S]``.
        attention_scaling: multiplies cos and sin (``rope_init``'s second result).
        dtype: dtype of the returned tables (the math is fp32).

    Returns:
        ``cos``, ``sin``: ``[B, S, rot_dim]`` in ``dtype``, each half repeating the same angles.

    Example:
        >>> inv_freq, scale = rope_init({"rope_theta": 10000.0}, 64)
        >>> cos, sin = rope_cos_sin(inv_freq, torch.arange(16)[None], attention_scaling=scale)
        >>> cos.shape
        torch.Size([1, 16, 64])
    """
    freqs = position_ids[..., None].float() * inv_freq.to(
        device=position_ids.device, dtype=torch.float
    )
    emb = torch.cat((freqs, freqs), dim=-1)
    cos = emb.cos() * attention_scaling
    sin = emb.sin() * attention_scaling
    return cos.to(dtype=dtype), sin.to(dtype=dtype)


def apply_rotary(
    q: torch.Tensor,
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    *,
    backend: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(q, k)`` rotated by the position angles (rotate-half convention).

    Equals transformers' ``apply_rotary_pos_emb(q, k, cos, sin)``; when ``cos.shape[-1] < D`` the
    first ``rot_dim`` dims rotate and the rest pass through unchanged (Phi-3 partial rotary).

    Args:
        q: queries ``[B, Hq, S, D]``.
        k: keys ``[B, Hk, S, D]``.
        cos: ``[B, S, rot_dim]`` from :func:`rope_cos_sin` (``B`` may be 1 to broadcast).
        sin: same shape as ``cos``.
        backend: ``"auto"``, ``"torch"`` or ``"triton"``.

    Returns:
        ``(q_embed, k_embed)`` shaped and typed like ``q`` and ``k``.

    Example:
        >>> q, k = torch.randn(1, 4, 16, 64), torch.randn(1, 2, 16, 64)
        >>> cos, sin = rope_cos_sin(rope_init({"rope_theta": 1e4}, 64)[0], torch.arange(16)[None])
        >>> [t.shape for t in apply_rotary(q, k, cos, sin)] == [q.shape, k.shape]
        True
    """
    rot_dim = cos.shape[-1]
    if (
        q.dim() != 4
        or k.dim() != 4
        or cos.dim() != 3
        or cos.shape != sin.shape
        or rot_dim % 2
        or rot_dim > q.shape[-1]
        or q.shape[-1] != k.shape[-1]
        or cos.shape[1] != q.shape[2]
    ):
        raise ValueError(
            "apply_rotary: expected q [B, Hq, S, D], k [B, Hk, S, D] and cos/sin [B, S, rot_dim] "
            f"with even rot_dim <= D; got q {tuple(q.shape)}, k {tuple(k.shape)}, cos "
            f"{tuple(cos.shape)}, sin {tuple(sin.shape)}. Build cos/sin with rope_cos_sin"
        )
    if resolve_backend("apply_rotary", backend, q.device) == "triton":
        from automodel.kernels._triton.rope import apply_rotary_triton

        return apply_rotary_triton(q, k, cos, sin)
    return _apply_rotary_torch(q, cos, sin), _apply_rotary_torch(k, cos, sin)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _apply_rotary_torch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The reference, with transformers' exact operation order."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    rot_dim = cos.shape[-1]
    if rot_dim == x.shape[-1]:
        return (x * cos) + (_rotate_half(x) * sin)
    x_rot, x_pass = x[..., :rot_dim], x[..., rot_dim:]
    return torch.cat([(x_rot * cos) + (_rotate_half(x_rot) * sin), x_pass], dim=-1)


def _require(p: Mapping[str, Any], key: str, rope_type: str) -> Any:
    if p.get(key) is None:
        raise ValueError(
            f"rope_init: rope_type={rope_type!r} needs rope_parameters[{key!r}]; add it to the "
            "config's rope_parameters"
        )
    return p[key]


def _require_max_pos(max_position_embeddings: int | None, rope_type: str) -> int:
    if max_position_embeddings is None:
        raise ValueError(
            f"rope_init: rope_type={rope_type!r} needs max_position_embeddings=; pass "
            "config.max_position_embeddings"
        )
    return max_position_embeddings


def _llama3(p: Mapping[str, Any], base: float, exponents: torch.Tensor) -> torch.Tensor:
    inv_freq = 1.0 / (base**exponents)
    factor = _require(p, "factor", "llama3")
    low_freq_factor = _require(p, "low_freq_factor", "llama3")
    high_freq_factor = _require(p, "high_freq_factor", "llama3")
    old_context_len = _require(p, "original_max_position_embeddings", "llama3")
    low_freq_wavelen = old_context_len / low_freq_factor
    high_freq_wavelen = old_context_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are divided by factor, short ones kept, the band between
    # interpolated smoothly.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _yarn(
    p: Mapping[str, Any],
    base: float,
    dim: int,
    exponents: torch.Tensor,
    max_position_embeddings: int | None,
) -> tuple[torch.Tensor, float]:
    original = _require(p, "original_max_position_embeddings", "yarn")
    factor = p.get("factor")
    if factor is None:
        factor = _require_max_pos(max_position_embeddings, "yarn") / original
    attention_factor = p.get("attention_factor")
    mscale, mscale_all_dim = p.get("mscale"), p.get("mscale_all_dim")
    if attention_factor is None:
        if mscale and mscale_all_dim:
            attention_factor = float(
                _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
            )
        else:
            attention_factor = _yarn_mscale(factor)
    beta_fast = p.get("beta_fast") or 32
    beta_slow = p.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return (dim * math.log(original / (num_rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if p.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoids a division by zero in the ramp, as transformers does
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base**exponents
    extrapolation_factor = 1 - ramp.to(device=exponents.device, dtype=torch.float)
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolation_factor) + (
        1.0 / pos_freqs
    ) * extrapolation_factor
    return inv_freq, attention_factor


def _longrope(
    p: Mapping[str, Any],
    base: float,
    exponents: torch.Tensor,
    max_position_embeddings: int | None,
    seq_len: int | torch.Tensor | None,
    device: torch.device | str | None,
) -> tuple[torch.Tensor, float]:
    original = _require(p, "original_max_position_embeddings", "longrope")
    long_factor = _require(p, "long_factor", "longrope")
    short_factor = _require(p, "short_factor", "longrope")
    factor = p.get("factor")
    if factor is None:
        factor = _require_max_pos(max_position_embeddings, "longrope") / original
    attention_factor = p.get("attention_factor")
    if attention_factor is None:
        if factor <= 1.0:
            attention_factor = 1.0
        else:
            attention_factor = math.sqrt(1 + math.log(factor) / math.log(original))
    chosen = long_factor if seq_len is not None and seq_len > original else short_factor
    ext_factors = torch.tensor(chosen, dtype=torch.float32, device=device)
    if ext_factors.numel() != exponents.numel():
        raise ValueError(
            f"rope_init: longrope factors must have rot_dim // 2 = {exponents.numel()} entries; got "
            f"{ext_factors.numel()}. Check head_dim and partial_rotary_factor against the config"
        )
    return 1.0 / (ext_factors * base**exponents), attention_factor
