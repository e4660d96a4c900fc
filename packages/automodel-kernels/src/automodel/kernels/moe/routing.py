"""Mixture-of-experts routing: top-k expert choice, the load-balance loss and the router z-loss."""

from __future__ import annotations

import torch

SCORE_FUNCS = ("softmax", "sigmoid")


def topk_route(
    router_logits: torch.Tensor,
    top_k: int,
    *,
    score_func: str = "softmax",
    normalize: bool = True,
    scaling: float = 1.0,
    bias: torch.Tensor | None = None,
    n_groups: int | None = None,
    topk_groups: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(weights [T, k] fp32, indices [T, k] int64, scores [T, E] fp32)`` for each token.

    Scores are ``softmax`` (Mixtral, Qwen-MoE) or ``sigmoid`` (DeepSeek-V3) of the fp32 logits. The
    experts are chosen on ``scores + bias`` (DeepSeek's load-balancing correction, which only steers
    the choice), optionally restricted to the ``topk_groups`` best of ``n_groups`` expert groups (a
    group's score is the sum of its two best experts, as DeepSeek-V3 does). The weights are the
    chosen experts' unbiased scores, renormalized to sum to 1 when ``normalize``, times ``scaling``.
    ``indices`` are sorted by descending choice score. Differentiable with respect to the logits.

    Args:
        router_logits: ``[T, E]`` router outputs, any float dtype.
        top_k: experts per token.
        score_func: ``"softmax"`` or ``"sigmoid"``.
        normalize: renormalize the ``k`` weights of each token to sum to 1.
        scaling: multiplies the final weights (DeepSeek's ``routed_scaling_factor``).
        bias: ``[E]`` added to the scores for the choice only (``e_score_correction_bias``).
        n_groups: split the experts into this many equal groups (grouped top-k), or None.
        topk_groups: how many groups each token may route to; needs ``n_groups``.

    Example:
        >>> w, idx, scores = topk_route(torch.randn(5, 8), 2)
        >>> w.shape, idx.shape, scores.shape
        (torch.Size([5, 2]), torch.Size([5, 2]), torch.Size([5, 8]))
    """
    num_experts = router_logits.shape[-1]
    _check_route_args(num_experts, top_k, score_func, bias, n_groups, topk_groups)
    logits = router_logits.float()
    scores = torch.softmax(logits, dim=-1) if score_func == "softmax" else torch.sigmoid(logits)
    choice = scores if bias is None else scores + bias.float()
    if n_groups is not None and topk_groups is not None:
        choice = _mask_to_best_groups(choice, n_groups, topk_groups)
    indices = torch.topk(choice, top_k, dim=-1).indices
    weights = scores.gather(-1, indices)
    if normalize:
        # The epsilon only matters for sigmoid scores that are all ~0; it never changes a softmax sum.
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if scaling != 1.0:
        weights = weights * scaling
    return weights, indices, scores


def _mask_to_best_groups(choice: torch.Tensor, n_groups: int, topk_groups: int) -> torch.Tensor:
    """Returns ``choice`` with every expert outside each token's best groups set to -inf."""
    tokens, num_experts = choice.shape
    grouped = choice.view(tokens, n_groups, num_experts // n_groups)
    best = min(2, grouped.shape[-1])
    group_scores = grouped.topk(best, dim=-1).values.sum(dim=-1)
    keep_groups = torch.topk(group_scores, topk_groups, dim=-1).indices
    group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep_groups, True)
    expert_mask = group_mask.unsqueeze(-1).expand_as(grouped).reshape(tokens, num_experts)
    return choice.masked_fill(~expert_mask, float("-inf"))


def _check_route_args(
    num_experts: int,
    top_k: int,
    score_func: str,
    bias: torch.Tensor | None,
    n_groups: int | None,
    topk_groups: int | None,
) -> None:
    if score_func not in SCORE_FUNCS:
        raise ValueError(f"topk_route: score_func={score_func!r}; expected one of {SCORE_FUNCS}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(
            f"topk_route: top_k={top_k} must be between 1 and the number of experts ({num_experts})"
        )
    if bias is not None and bias.shape != (num_experts,):
        raise ValueError(
            f"topk_route: bias must have shape [E] = [{num_experts}], got {tuple(bias.shape)}"
        )
    if (n_groups is None) != (topk_groups is None):
        raise ValueError(
            "topk_route: give n_groups and topk_groups together (grouped top-k), or neither; got "
            f"n_groups={n_groups}, topk_groups={topk_groups}"
        )
    if n_groups is not None and topk_groups is not None:
        if num_experts % n_groups != 0:
            raise ValueError(
                f"topk_route: n_groups={n_groups} must divide the number of experts ({num_experts})"
            )
        if not 1 <= topk_groups <= n_groups:
            raise ValueError(
                f"topk_route: topk_groups={topk_groups} must be between 1 and n_groups={n_groups}"
            )
        if top_k > topk_groups * (num_experts // n_groups):
            raise ValueError(
                f"topk_route: top_k={top_k} exceeds the experts in the {topk_groups} kept groups "
                f"({topk_groups * (num_experts // n_groups)}); raise topk_groups or lower top_k"
            )


def load_balance_loss(
    router_logits: torch.Tensor,
    indices: torch.Tensor,
    num_experts: int,
    top_k: int,
    *,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Returns the Switch-Transformer auxiliary loss ``E * sum_e f_e * P_e`` (a 0-d fp32 tensor).

    ``f_e`` is the fraction of tokens routed to expert ``e`` (counting every one of a token's ``k``
    choices), ``P_e`` the mean softmax probability of ``e``; padding tokens are left out when
    ``attention_mask`` is given. Equals transformers' ``load_balancing_loss_func`` on the same logits
    when ``indices`` are its softmax top-k; layers are concatenated along the token dimension as it
    does. No host sync.

    Args:
        router_logits: ``[N, E]``: the router logits of one or several layers (concatenated).
        indices: ``[N, k]`` chosen experts (``topk_route``'s indices).
        num_experts: ``E``.
        top_k: ``k``.
        attention_mask: ``[B, S]`` (1 = real token) with ``N`` a multiple of ``B * S``.

    Example:
        >>> logits = torch.randn(6, 4)
        >>> _, idx, _ = topk_route(logits, 2)
        >>> load_balance_loss(logits, idx, 4, 2).shape
        torch.Size([])
    """
    if router_logits.shape[-1] != num_experts or indices.shape != (router_logits.shape[0], top_k):
        raise ValueError(
            f"load_balance_loss: expected router_logits [N, {num_experts}] and indices [N, {top_k}], "
            f"got {tuple(router_logits.shape)} and {tuple(indices.shape)}"
        )
    probs = torch.softmax(router_logits.float(), dim=-1)
    rows = router_logits.shape[0]
    if attention_mask is None:
        weight = torch.ones(rows, device=probs.device)
    else:
        flat = attention_mask.reshape(-1).to(device=probs.device, dtype=torch.float32)
        if rows % flat.numel() != 0:
            raise ValueError(
                f"load_balance_loss: {rows} router rows is not a multiple of the attention_mask's "
                f"{flat.numel()} tokens; pass the mask of the batch these logits came from"
            )
        weight = flat.repeat(rows // flat.numel())
    total = weight.sum()
    counts = torch.zeros(num_experts, device=probs.device).scatter_add_(
        0, indices.reshape(-1), weight.repeat_interleave(top_k)
    )
    prob_sum = (probs * weight.unsqueeze(-1)).sum(dim=0)
    return num_experts * torch.sum((counts / total) * (prob_sum / total))


def router_z_loss(router_logits: torch.Tensor) -> torch.Tensor:
    """Returns ST-MoE's router z-loss: the mean over tokens of ``logsumexp(logits) ** 2`` (fp32).

    Example:
        >>> float(router_z_loss(torch.zeros(3, 4))) == float(torch.log(torch.tensor(4.0)) ** 2)
        True
    """
    return torch.logsumexp(router_logits.float(), dim=-1).square().mean()
