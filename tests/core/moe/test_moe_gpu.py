"""GPU: grouped-GEMM experts in bf16 stay within 1e-2 of transformers' fp32 per-expert loop.

For the experts of the tiny Mixtral and Qwen3-MoE of the harness and of a wider Qwen3-MoE (16
experts, hidden 256, 16-aligned, so ``automodel.kernels.grouped_mm`` takes ``torch._grouped_mm`` on
Hopper: asserted by counting the calls), the module patched by ``patch_moe_experts`` runs in bf16
on CUDA and is compared with transformers' own loop (``experts_implementation="eager"``) in fp32
on the same bf16-rounded weights, for the same routing: relative error ``||out - ref|| / ||ref||``
of the output and of every gradient (hidden states, routing weights, ``gate_up_proj``,
``down_proj``) below 1e-2; a NaN or inf never passes.

The routing is fixed (given to the experts) because in a whole bf16 model top-k ties flip between
bf16 and fp32 and dominate the difference: measured on the tiny models, transformers' own bf16 loop
is 1.5e-2 (Mixtral) to 1e-1 (Qwen3-MoE) off the fp32 gradients. The whole-model test therefore
compares ours with transformers' own bf16 model (the same precision class) and bounds both against
fp32: loss within 1e-2 of transformers' bf16 loss, within 1e-2 of fp32 or 1.5x transformers' own
bf16 error, every gradient within 1e-2 of fp32 or 4x transformers' bf16 error, all finite.

History (2026-11-27, H200): the Mixtral case once failed at loss 1.84e-2 from fp32 (6.2231 vs
6.3401) with labels on the left-padding positions too. The same comparison in bf16 on the CPU
(transformers 5.24) gives ours 1.5e-4 and transformers' bf16 loop 1.7e-4 from fp32, ours vs the
loop 2.7e-5, no routing flip in either layer: no precision loss in the grouped path itself
(routing and softmax are transformers' own, in fp32; ours rounds the k routing weights to bf16 and
sums a token's k weighted expert outputs in one fp32-accumulated product, where transformers rounds
each weighted output to bf16 and adds them in bf16: the same order of error). The
padded positions (fully masked attention rows, kernel-defined output) are no longer scored, and
the assertion message reports all three losses.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest
import torch

from automodel.core.moe import patch_moe_experts
from harness import build_tiny_model

pytestmark = pytest.mark.gpu

TOL = 1e-2


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """Returns ``||out - ref|| / ||ref||`` in fp64; inf when ``out`` is not finite."""
    out, ref = out.detach().double(), ref.detach().double()
    if not torch.isfinite(out).all():
        return math.inf
    ref_norm = ref.norm().item()
    diff = (out - ref).norm().item()
    if ref_norm == 0.0:  # e.g. an expert no token reached: both gradients must be zero
        return 0.0 if diff == 0.0 else math.inf
    return diff / ref_norm


def _use_loop(model: Any) -> None:
    """Makes ``model`` run transformers' per-expert Python loop (its eager experts forward)."""
    if hasattr(model, "set_experts_implementation"):
        model.set_experts_implementation("eager")
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_experts_implementation"):
            config._experts_implementation = "eager"


def _experts_of(model: Any) -> Any:
    from automodel.core.moe import is_experts_module

    return next(m for m in model.modules() if is_experts_module(m))


def _check_experts(experts: Any, tokens: int, top_k: int, seed: int = 0) -> dict[str, float]:
    """Returns the relative errors of the patched bf16 experts against the fp32 loop."""
    experts = experts.to(device="cuda", dtype=torch.bfloat16)  # round the weights once
    ref = copy.deepcopy(experts).float()
    _use_loop(ref)
    ours = copy.deepcopy(experts)
    assert patch_moe_experts(ours) == [""]
    num_experts, _, hidden = experts.gate_up_proj.shape
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=gen).bfloat16()  # the same inputs for both
    index = torch.rand(tokens, num_experts, generator=gen).argsort(dim=-1)[:, :top_k]
    weights = torch.rand(tokens, top_k, generator=gen).softmax(dim=-1).bfloat16()
    probe = torch.randn(tokens, hidden, generator=gen).cuda()  # a loss with varied gradients
    index = index.cuda()
    assert torch.bincount(index.flatten(), minlength=num_experts).min() > 0  # every expert used

    def run(module: Any, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        xs = x.cuda().to(dtype).detach().clone().requires_grad_()
        ws = weights.cuda().to(dtype).detach().clone().requires_grad_()
        out = module(xs, index, ws)
        (out.float() * probe).sum().backward()
        return {
            "out": out.detach(),
            "grad hidden": xs.grad,
            "grad top_k_weights": ws.grad,
            "grad gate_up_proj": module.gate_up_proj.grad,
            "grad down_proj": module.down_proj.grad,
        }

    got, want = run(ours, torch.bfloat16), run(ref, torch.float32)
    assert got["out"].dtype == torch.bfloat16
    errors = {k: _rel_err(got[k], want[k]) for k in want}
    bad = {k: v for k, v in errors.items() if not v < TOL}
    assert not bad, f"relative error >= {TOL} against the fp32 loop: {bad}"
    return errors


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_grouped_experts_bf16_match_fp32_loop(name):
    model = build_tiny_model(name)
    _check_experts(_experts_of(model), tokens=64, top_k=model.config.num_experts_per_tok)


def test_wide_experts_take_torch_grouped_mm(monkeypatch):
    from transformers import Qwen3MoeForCausalLM

    config = _wide_qwen3_moe_config()
    torch.manual_seed(0)
    experts = _experts_of(Qwen3MoeForCausalLM(config))
    calls: list[tuple[int, ...]] = []
    real = torch._grouped_mm

    def counting(*args: Any, **kwargs: Any) -> torch.Tensor:
        calls.append(tuple(args[0].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch, "_grouped_mm", counting)
    _check_experts(experts, tokens=512, top_k=config.num_experts_per_tok)
    if torch.cuda.get_device_capability()[0] >= 9:
        # forward gate_up and down, backward dx and dw of each: 6 (the fp32 loop never calls it)
        assert len(calls) >= 6, calls


def _wide_qwen3_moe_config() -> Any:
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=384,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_experts=16,
        num_experts_per_tok=4,
        norm_topk_prob=True,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        mlp_only_layers=[],
        decoder_sparse_step=1,
        tie_word_embeddings=False,
        pad_token_id=0,
    )


def test_grouped_experts_no_host_sync_and_ep_hooks_compose_to_forward():
    """The patched bf16 experts' forward+backward never syncs with the host, and the hooks
    expert parallelism runs (``permute_tokens``, ``grouped_expert_mlp``, ``unpermute_tokens``)
    compose to exactly the module's own forward (same kernels, same order: bitwise equal)."""
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(0)
    experts = _experts_of(Qwen3MoeForCausalLM(_wide_qwen3_moe_config()))
    experts = experts.to(device="cuda", dtype=torch.bfloat16)
    assert patch_moe_experts(experts) == [""]
    num_experts, _, hidden = experts.gate_up_proj.shape
    x = torch.randn(512, hidden, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    index = torch.rand(512, num_experts, device="cuda").argsort(dim=-1)[:, :4]
    weights = torch.rand(512, 4, device="cuda").softmax(dim=-1).bfloat16().requires_grad_()

    def step() -> torch.Tensor:
        out = experts(x, index, weights)
        out.float().square().sum().backward()
        return out.detach()

    expected = step()  # compiles the Triton kernels outside the check
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    rows, row_map, counts = experts.permute_tokens(x, index, num_experts + 1)
    assert int(counts[-1]) == 0 and int(counts.sum()) == 512 * 4
    out = experts.grouped_expert_mlp(
        rows, counts[:num_experts], experts.gate_up_proj, experts.down_proj
    )
    assert torch.equal(experts.unpermute_tokens(out, row_map, weights), expected)


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_whole_model_bf16_loss_and_finite_grads(name):
    model = build_tiny_model(name).train().to(device="cuda", dtype=torch.bfloat16)
    _use_loop(model)
    ref = copy.deepcopy(model).float()
    ours = copy.deepcopy(model)
    assert len(patch_moe_experts(ours)) == model.config.num_hidden_layers
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(6, model.config.vocab_size, (2, 32), generator=gen).cuda()
    mask = torch.ones_like(ids)
    mask[1, :8] = 0  # left padding in the second row
    # Padded positions are not scored: their attention rows are fully masked, and what a kernel
    # returns there differs between the bf16 and fp32 SDPA kernels.
    labels = ids.masked_fill(mask == 0, -100)
    outs = {}
    for label, m in (("ours", ours), ("loop", model), ("ref", ref)):
        out = m(input_ids=ids, attention_mask=mask, labels=labels)
        out.loss.backward()
        outs[label] = out
    losses = {k: float(v.loss.detach()) for k, v in outs.items()}
    ours_err = _rel_err(outs["ours"].loss, outs["ref"].loss)
    loop_err = _rel_err(outs["loop"].loss, outs["ref"].loss)
    report = (
        f"losses {losses}; ours vs fp32 {ours_err:.2e}, transformers bf16 vs fp32 {loop_err:.2e}"
    )
    # Same precision class as transformers' own bf16 model, and close to the fp32 reference:
    assert _rel_err(outs["ours"].loss, outs["loop"].loss) < TOL, report
    assert ours_err < max(TOL, 1.5 * loop_err), report
    assert loop_err < 5 * TOL, report  # the bf16 floor itself stays bounded
    assert torch.isfinite(outs["ours"].logits).all()
    ref_params = dict(ref.named_parameters())
    loop_params = dict(model.named_parameters())
    for pname, param in ours.named_parameters():
        assert param.grad is not None, pname
        ours_err = _rel_err(param.grad, ref_params[pname].grad)
        loop_err = _rel_err(loop_params[pname].grad, ref_params[pname].grad)
        # bf16 routing flips set the floor; grouped experts must not be grossly worse than it
        assert ours_err < max(TOL, 4 * loop_err), (pname, ours_err, loop_err)
