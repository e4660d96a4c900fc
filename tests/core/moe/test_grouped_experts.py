"""MoE through the public API: ``automodel.core.AutoModelForCausalLM`` of a Mixtral / Qwen3-MoE
checkpoint runs its experts as grouped GEMMs and equals transformers' own class (fp32): logits,
loss, aux loss, gradients and generated tokens. The same holds, by structure, for the layouts of
Qwen2-MoE (a sigmoid-gated shared expert) and DeepSeek-V3 (shared expert, sigmoid routing with a
bias correction, grouped top-k, routed scaling): routing stays transformers' own."""

from __future__ import annotations

import logging

import pytest
import torch
import transformers

from automodel.core import AutoModelForCausalLM
from automodel.core.moe import (
    grouped_forward_matches,
    is_experts_module,
    moe_load_stats,
    patch_moe_experts,
)
from harness import MOE_MODELS, build_tiny_model, tiny_config
from harness.models import MORE_MOE_MODELS


def _batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, 384, (2, 20), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0  # left padding in the second row
    return ids, mask


def _experts(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if is_experts_module(m)]


def _set_routing_bias(model: torch.nn.Module) -> None:
    """Gives DeepSeek's ``e_score_correction_bias`` (zeros at init) values that change the choice."""
    gen = torch.Generator().manual_seed(3)
    for module in model.modules():
        bias = getattr(module, "e_score_correction_bias", None)
        if isinstance(bias, torch.Tensor):
            bias.copy_(torch.randn(bias.shape, generator=gen) * 0.2)


@pytest.mark.slow
@pytest.mark.parametrize("name", MOE_MODELS + MORE_MOE_MODELS)
def test_public_api_grouped_experts_match_transformers(name, tiny_model_dir, caplog):
    path = tiny_model_dir(name)
    with caplog.at_level(logging.INFO, logger="automodel.core"):
        ours = AutoModelForCausalLM.from_pretrained(path, output_router_logits=True)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, output_router_logits=True)
    with torch.no_grad():
        _set_routing_bias(ours)
        _set_routing_bias(ref)
    experts = _experts(ours)
    moe_layers = ref.config.num_hidden_layers - getattr(ref.config, "first_k_dense_replace", 0)
    assert len(experts) == moe_layers
    assert all(getattr(m, "_automodel_grouped", False) for m in experts)
    grouped = f"{type(experts[0]).__name__} (grouped GEMM)"
    assert ours._automodel_patches.modules[grouped] == len(experts)
    assert grouped in caplog.text  # what was patched is logged
    assert patch_moe_experts(ours) == [n for n, m in ours.named_modules() if is_experts_module(m)]

    ids, mask = _batch()
    ref_out = ref(input_ids=ids, attention_mask=mask, labels=ids)
    our_out = ours(input_ids=ids, attention_mask=mask, labels=ids)
    torch.testing.assert_close(our_out.logits, ref_out.logits, atol=1e-5, rtol=0)
    if name != "deepseek_v3":  # transformers' DeepSeek-V3 returns no aux loss
        assert ref_out.aux_loss is not None and float(ref_out.aux_loss.detach()) > 0
        torch.testing.assert_close(our_out.aux_loss, ref_out.aux_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(our_out.loss, ref_out.loss, atol=1e-5, rtol=1e-6)

    ref_out.loss.backward()
    our_out.loss.backward()
    ref_grads = dict(ref.named_parameters())
    for pname, param in ours.named_parameters():
        expected = ref_grads[pname].grad
        assert param.grad is not None, pname
        torch.testing.assert_close(param.grad, expected, atol=1e-5, rtol=1e-5, msg=pname)

    ours.zero_grad(set_to_none=True)
    ref.zero_grad(set_to_none=True)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    prompt = _batch(1)[0][:1]
    assert torch.equal(ours.generate(prompt, **kwargs), ref.generate(prompt, **kwargs))


def test_kernels_none_keeps_transformers_experts(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir("qwen3_moe"), kernels="none")
    experts = _experts(model)
    assert experts and not any(getattr(m, "_automodel_grouped", False) for m in experts)
    assert "forward" not in vars(experts[0])  # the class's (transformers') forward


def test_from_config_groups_experts_under_an_ambient_device():
    # the probes run on the CPU even when the model is built on meta (or "cuda") by context
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_config("mixtral"), dtype=torch.bfloat16)
    experts = _experts(model)
    assert experts[0].gate_up_proj.device.type == "meta"
    assert all(getattr(m, "_automodel_grouped", False) for m in experts)


def test_probe_rejects_a_layout_the_grouped_path_does_not_implement():
    experts = _experts(build_tiny_model("qwen3_moe"))[0]
    assert grouped_forward_matches(experts)
    # transformers' transposed layout ([E, H, 2I]) with square sizes passes the shape check only
    # when 2I == H; an interleaved gate/up layout keeps the shapes: the probe must catch it.
    experts.is_concatenated = False
    original = type(experts).forward.__wrapped__

    def interleaved(self, hidden, index, weights):  # gate/up rows interleaved instead of stacked
        gate_up = self.gate_up_proj
        stacked = torch.cat([gate_up[:, 0::2], gate_up[:, 1::2]], dim=1)
        saved = self._parameters["gate_up_proj"]
        self._parameters["gate_up_proj"] = torch.nn.Parameter(stacked)
        try:
            return original(self, hidden, index, weights)
        finally:
            self._parameters["gate_up_proj"] = saved

    cls = type("InterleavedExperts", (type(experts),), {"forward": interleaved})
    experts.__class__ = cls
    assert not grouped_forward_matches(experts)


def test_load_stats_count_every_routed_token():
    model = build_tiny_model("qwen3_moe")
    assert moe_load_stats(model) is None
    patch_moe_experts(model)
    ids, _ = _batch()
    with torch.no_grad():
        model(input_ids=ids)
    stats = moe_load_stats(model)
    assert stats is not None
    cfg = model.config
    assert stats.tokens_per_expert.shape == (cfg.num_hidden_layers, cfg.num_experts)
    # every token is routed to top_k experts in every layer
    assert torch.all(stats.tokens_per_expert.sum(dim=1) == ids.numel() * cfg.num_experts_per_tok)
    metrics = stats.to_metrics()
    assert metrics["moe/imbalance_max"] >= metrics["moe/imbalance_mean"] >= 1.0


def test_dense_models_are_left_alone():
    model = build_tiny_model("llama")
    assert patch_moe_experts(model) == []
    assert isinstance(model, transformers.PreTrainedModel)


def test_local_expert_hook_for_expert_parallelism_matches_a_loop():
    # what an all-to-all forward calls with this rank's shard (experts 2..3 of 4)
    experts = _experts(build_tiny_model("mixtral"))[0]
    patch_moe_experts(torch.nn.ModuleList([experts]))
    gate_up, down = experts.gate_up_proj[2:], experts.down_proj[2:]
    rows = torch.randn(7, gate_up.shape[-1], generator=torch.Generator().manual_seed(0))
    sizes = [3, 4]
    got = experts.grouped_expert_mlp(rows, torch.tensor(sizes), gate_up, down)
    want = []
    for e, chunk in enumerate(rows.split(sizes)):
        gate, up = torch.nn.functional.linear(chunk, gate_up[e]).chunk(2, dim=-1)
        want.append(torch.nn.functional.linear(experts.act_fn(gate) * up, down[e]))
    torch.testing.assert_close(got, torch.cat(want), atol=1e-6, rtol=1e-6)


def test_permute_hooks_for_expert_parallelism_compose_to_the_forward_with_dropped_slots():
    # The all-to-all forward permutes with E + 1 groups (a router's dropped slots, index E, last),
    # sends the first rows, pads the dropped ones with zeros and combines with unpermute_tokens.
    experts = _experts(build_tiny_model("mixtral"))[0]
    patch_moe_experts(torch.nn.ModuleList([experts]))
    num_experts, _, hidden = experts.gate_up_proj.shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, hidden, generator=gen)
    index = torch.randint(0, num_experts, (5, 2), generator=gen)
    weights = torch.rand(5, 2, generator=gen)
    index[1, 0] = num_experts  # dropped
    rows, row_map, counts = experts.permute_tokens(x, index, num_experts + 1)
    assert counts.tolist()[-1] == 1 and rows.shape == (10, hidden)
    kept = int(counts[:num_experts].sum())
    out = experts.grouped_expert_mlp(
        rows[:kept], counts[:num_experts], experts.gate_up_proj, experts.down_proj
    )
    out = torch.cat([out, out.new_zeros(rows.shape[0] - kept, hidden)])
    got = experts.unpermute_tokens(out, row_map, weights)
    dropped = index == num_experts
    want = experts(x, index.masked_fill(dropped, 0), weights.masked_fill(dropped, 0))
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
