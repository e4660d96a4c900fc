"""MoE routing, permute/unpermute and grouped_mm against plain loops and transformers' modules."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from automodel.kernels.moe import (
    grouped_mm,
    load_balance_loss,
    permute,
    router_z_loss,
    swiglu_packed,
    topk_route,
    unpermute,
)


def _backends() -> list[str]:
    """The grouped_mm backends that run here: the loop always, torch._grouped_mm where torch has it."""
    backends = ["torch"]
    try:
        torch._grouped_mm(
            torch.randn(4, 16), torch.randn(2, 16, 16), offs=torch.tensor([2, 4], dtype=torch.int32)
        )
        backends.append("grouped_mm")
    except (AttributeError, RuntimeError, NotImplementedError):
        pass
    return backends


BACKENDS = _backends()


def _loop_route(logits: torch.Tensor, top_k: int, **kw: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """One token at a time, with Python sorting: the routing rule as written in topk_route's docstring."""
    weights, indices = [], []
    num_experts = logits.shape[1]
    for row in logits.double():
        scores = (
            torch.softmax(row, 0)
            if kw.get("score_func", "softmax") == "softmax"
            else torch.sigmoid(row)
        )
        choice = [
            float(s) + (float(kw["bias"][e]) if "bias" in kw else 0.0) for e, s in enumerate(scores)
        ]
        candidates = list(range(num_experts))
        if "n_groups" in kw:
            size = num_experts // kw["n_groups"]
            groups = [list(range(g * size, (g + 1) * size)) for g in range(kw["n_groups"])]
            group_score = [sum(sorted((choice[e] for e in g), reverse=True)[:2]) for g in groups]
            best = sorted(range(len(groups)), key=lambda g: -group_score[g])[: kw["topk_groups"]]
            candidates = [e for g in best for e in groups[g]]
        chosen = sorted(candidates, key=lambda e: -choice[e])[:top_k]
        w = scores[chosen]
        if kw.get("normalize", True):
            w = w / w.sum()
        weights.append(w * kw.get("scaling", 1.0))
        indices.append(torch.tensor(chosen))
    return torch.stack(weights), torch.stack(indices)


def test_topk_route_matches_a_per_token_loop() -> None:
    torch.manual_seed(0)
    logits = torch.randn(40, 16)
    bias = torch.randn(16) * 0.1
    settings: list[dict[str, Any]] = [
        dict(),
        dict(normalize=False),
        dict(score_func="sigmoid", bias=bias, scaling=2.5),
        dict(score_func="sigmoid", bias=bias, n_groups=4, topk_groups=2, scaling=2.5),
        dict(score_func="softmax", n_groups=8, topk_groups=3, normalize=False),
    ]
    for kw in settings:
        weights, indices, scores = topk_route(logits, 4, **kw)
        want_w, want_i = _loop_route(logits, 4, **kw)
        assert torch.equal(indices, want_i), kw
        torch.testing.assert_close(weights.double(), want_w, atol=1e-6, rtol=1e-6)
        assert weights.dtype == scores.dtype == torch.float32 and scores.shape == (40, 16)
    # The weights carry gradients back to the router logits.
    leaf = logits.clone().requires_grad_()
    topk_route(leaf, 2)[0][:, 0].sum().backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0


def test_topk_route_matches_transformers_routers() -> None:
    from transformers import DeepseekV3Config, MixtralConfig, Qwen3MoeConfig
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    from transformers.models.mixtral.modeling_mixtral import MixtralTopKRouter
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeTopKRouter

    torch.manual_seed(0)
    hidden = torch.randn(30, 32)
    common = dict(hidden_size=32, num_experts_per_tok=3)
    mixtral = MixtralTopKRouter(MixtralConfig(num_local_experts=8, **common))
    qwen = Qwen3MoeTopKRouter(Qwen3MoeConfig(num_experts=8, norm_topk_prob=False, **common))
    deepseek = DeepseekV3TopkRouter(
        DeepseekV3Config(
            n_routed_experts=16,
            n_group=4,
            topk_group=2,
            norm_topk_prob=True,
            routed_scaling_factor=2.5,
            **common,
        )
    )
    for router in (mixtral, qwen, deepseek):
        torch.nn.init.normal_(router.weight)
    deepseek.e_score_correction_bias.copy_(torch.randn(16) * 0.1)
    cases = [
        (mixtral, dict()),
        (qwen, dict(normalize=False)),
        (
            deepseek,
            dict(
                score_func="sigmoid",
                bias=deepseek.e_score_correction_bias,
                n_groups=4,
                topk_groups=2,
                scaling=2.5,
            ),
        ),
    ]
    for router, kw in cases:
        logits, want_w, want_i = router(hidden)
        weights, indices, _ = topk_route(logits, 3, **kw)
        # DeepSeek's router does not sort its top-k; compare in expert order.
        order, want_order = indices.argsort(-1), want_i.argsort(-1)
        assert torch.equal(indices.gather(-1, order), want_i.gather(-1, want_order)), type(
            router
        ).__name__
        torch.testing.assert_close(
            weights.gather(-1, order), want_w.float().gather(-1, want_order), atol=1e-6, rtol=1e-6
        )


def test_load_balance_loss_matches_transformers() -> None:
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    torch.manual_seed(0)
    layers = (torch.randn(2 * 7, 8), torch.randn(2 * 7, 8))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    logits = torch.cat(layers)
    _, indices, _ = topk_route(logits, 2)
    for attention_mask in (None, mask):
        want = load_balancing_loss_func(layers, 8, 2, attention_mask)
        got = load_balance_loss(logits, indices, 8, 2, attention_mask=attention_mask)
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    leaf = logits.clone().requires_grad_()
    load_balance_loss(leaf, indices, 8, 2).backward()
    assert leaf.grad is not None and leaf.grad.abs().sum() > 0
    z = torch.stack([torch.log(torch.exp(row.double()).sum()) ** 2 for row in logits]).mean()
    torch.testing.assert_close(router_z_loss(logits).double(), z, atol=1e-6, rtol=1e-6)


def _loop_grouped(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    out, start = [], 0
    for e, n in enumerate(counts):
        out.append(x[start : start + n] @ w[e])
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["transformers", "row_major"])
def test_grouped_mm_matches_a_per_expert_loop_with_empty_experts(backend: str, layout: str) -> None:
    torch.manual_seed(0)
    counts = [5, 0, 7, 0, 4]
    x = torch.randn(sum(counts), 16, requires_grad=True)
    if layout == "transformers":  # [E, out, in] parameters, multiplied through a transposed view
        w_full = torch.randn(5, 24, 16, requires_grad=True)
        view = lambda: w_full.transpose(1, 2)  # noqa: E731
    else:  # [E, in, out] parameters used as they are
        w_full = torch.randn(5, 16, 24, requires_grad=True)
        view = lambda: w_full  # noqa: E731
    grad = torch.randn(sum(counts), 24)
    w = view()
    seen: list[torch.Tensor] = []
    if w is not w_full:
        w.register_hook(seen.append)
    got = grouped_mm(x, w, torch.tensor(counts), backend=backend)
    got.backward(grad)
    gx, gw = x.grad, w_full.grad
    if seen and backend == "grouped_mm":
        # The weight gradient comes back in the parameter's own layout: no strided copy.
        assert seen[0].transpose(1, 2).is_contiguous()
    x.grad = w_full.grad = None
    want = _loop_grouped(x, view(), counts)
    want.backward(grad)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gx, x.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gw, w_full.grad, atol=1e-5, rtol=1e-5)
    assert (
        gw is not None
        and torch.equal(gw[1], torch.zeros_like(gw[1]))
        and torch.equal(gw[3], torch.zeros_like(gw[3]))
    )


def test_grouped_mm_rejects_bad_inputs() -> None:
    x, w = torch.randn(6, 4), torch.randn(2, 4, 3)
    with pytest.raises(ValueError, match="sums to 5"):
        grouped_mm(x, w, torch.tensor([2, 3]), backend="torch")
    with pytest.raises(ValueError, match="tokens_per_expert must be"):
        grouped_mm(x, w, torch.tensor([6]))
    with pytest.raises(ValueError, match="expected x"):
        grouped_mm(x, torch.randn(2, 5, 3), torch.tensor([3, 3]))


def test_permute_unpermute_round_trip_and_gradients() -> None:
    torch.manual_seed(0)
    x = torch.randn(9, 6, requires_grad=True)
    indices = torch.randint(0, 4, (9, 3))
    weights = torch.rand(9, 3, requires_grad=True)
    permuted, row_map, counts = permute(x, indices, 4)
    assert counts.tolist() == torch.bincount(indices.flatten(), minlength=4).tolist()
    experts = indices.flatten()[row_map]
    assert torch.equal(experts, experts.sort().values)  # grouped by expert, in expert order
    assert torch.equal(permuted, x[row_map // 3])
    # Expert e scales its rows by (e + 1): out[t] = sum_j w[t, j] * (idx[t, j] + 1) * x[t].
    out = unpermute(permuted * (experts + 1).unsqueeze(1), row_map, weights)
    want = ((weights * (indices + 1)).sum(1, keepdim=True) * x).detach()
    torch.testing.assert_close(out, want, atol=1e-6, rtol=1e-6)
    grad = torch.randn(9, 6)
    out.backward(grad)
    torch.testing.assert_close(
        x.grad, (weights * (indices + 1)).sum(1, keepdim=True).detach() * grad, atol=1e-6, rtol=1e-6
    )
    torch.testing.assert_close(
        weights.grad, (indices + 1) * (grad * x.detach()).sum(1, keepdim=True), atol=1e-5, rtol=1e-5
    )


# The Triton interpreter parity checks of permute/unpermute and swiglu_packed (both directions,
# against backend="torch") run inside the 2-rank launch of tests/core/moe/test_moe_checkpoint.py
# (`_triton_moe_pairs`): one interpreter start instead of two for the CI budget.


def test_swiglu_packed_reference_and_bad_input() -> None:
    gate_up = torch.randn(5, 12, dtype=torch.float64)
    torch.testing.assert_close(
        swiglu_packed(gate_up), F.silu(gate_up[:, :6]) * gate_up[:, 6:], rtol=0, atol=0
    )
    with pytest.raises(ValueError, match="even last dimension"):
        swiglu_packed(torch.randn(4, 7))


@pytest.mark.gpu
def test_gpu_swiglu_packed_bf16_against_fp32(assert_rel_close) -> None:
    torch.manual_seed(4)
    gate_up32 = torch.randn(1000, 2 * 768, device="cuda") * 2
    upstream = torch.randn(1000, 768, device="cuda")
    got_in = gate_up32.bfloat16().requires_grad_(True)
    want_in = gate_up32.clone().requires_grad_(True)
    got = swiglu_packed(got_in, backend="triton")
    want = swiglu_packed(want_in, backend="torch")
    got.backward(upstream.bfloat16())
    want.backward(upstream)
    assert_rel_close(got, want, 1e-2, "swiglu_packed")
    assert_rel_close(got_in.grad, want_in.grad, 1e-2, "d_gate_up")


@pytest.mark.gpu
def test_gpu_permute_unpermute_bf16_against_fp32(assert_rel_close) -> None:
    """The compiled Triton kernels in bf16 against the torch reference in fp32, no host sync."""
    torch.manual_seed(3)
    tokens, top_k, experts, hidden = 300, 8, 16, 2048
    x32 = torch.randn(tokens, hidden, device="cuda")
    indices = torch.rand(tokens, experts, device="cuda").argsort(-1)[:, :top_k]
    w32 = torch.rand(tokens, top_k, device="cuda")
    scale = torch.randn(tokens * top_k, hidden, device="cuda")
    upstream = torch.randn(tokens, hidden, device="cuda")
    results = []
    for backend, dtype in (("torch", torch.float32), ("triton", torch.bfloat16)):
        x = x32.to(dtype).requires_grad_(True)
        w = w32.clone().requires_grad_(True)
        torch.cuda.set_sync_debug_mode("error" if backend == "triton" else "default")
        try:
            permuted, row_map, _ = permute(x, indices, experts, backend=backend)
            out = unpermute(permuted * scale.to(dtype), row_map, w, backend=backend)
            grads = torch.autograd.grad(out, (x, w), upstream.to(dtype))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        results.append((out, *grads))
    for name, got, want in zip(("out", "d_x", "d_weights"), results[1], results[0], strict=True):
        assert_rel_close(got, want, 1e-2, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_moe_block_built_from_the_kernels_matches_transformers_mixtral(backend: str) -> None:
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    torch.manual_seed(0)
    config = MixtralConfig(
        hidden_size=32, intermediate_size=48, num_local_experts=6, num_experts_per_tok=2
    )
    block = MixtralSparseMoeBlock(config)
    for p in block.parameters():
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 11, 32)
    grad = torch.randn(2, 11, 32)

    def ours(hidden: torch.Tensor) -> torch.Tensor:
        flat = hidden.reshape(-1, 32)
        weights, indices, _ = topk_route(F.linear(flat, block.gate.weight), 2)
        permuted, row_map, counts = permute(flat, indices, 6)
        gate, up = grouped_mm(
            permuted, block.experts.gate_up_proj.transpose(1, 2), counts, backend=backend
        ).chunk(2, dim=-1)
        y = grouped_mm(
            F.silu(gate) * up, block.experts.down_proj.transpose(1, 2), counts, backend=backend
        )
        return unpermute(y, row_map, weights).view_as(hidden)

    results = []
    for fn in (ours, block):
        block.zero_grad()
        leaf = x.clone().requires_grad_()
        out = fn(leaf)
        out.backward(grad)
        results.append([out.detach(), leaf.grad, *(p.grad.clone() for p in block.parameters())])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
def test_gpu_grouped_mm_bf16_against_fp64_loop() -> None:
    torch.manual_seed(0)
    counts = torch.tensor([512, 0, 1024, 300, 0, 2048, 7, 1000], device="cuda")
    x = torch.randn(
        int(counts.sum()), 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True
    )
    w = torch.randn(8, 768, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(x.shape[0], 768, device="cuda", dtype=torch.bfloat16)
    out = grouped_mm(x, w.transpose(1, 2), counts)  # auto: torch._grouped_mm on sm90+
    out.backward(grad)
    xd, wd = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref = _loop_grouped(xd, wd.transpose(1, 2), counts.tolist())
    ref.backward(grad.double())
    for got, want in ((out, ref), (x.grad, xd.grad), (w.grad, wd.grad)):
        assert got is not None and want is not None and not torch.isnan(got).any()
        assert float((got.double() - want).norm() / want.norm()) < 1e-2
    assert w.grad is not None and float(w.grad[1].abs().max()) == 0.0
