"""LoRA on fused MoE experts: per-expert adapters in peft's per-expert layout, loaded by peft into
transformers 5's fused experts with identical outputs, and back into automodel."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file

from automodel.core import AutoModelForCausalLM
from automodel.core.peft import (
    LoraConfig,
    adapter_parameters,
    apply_peft,
    expert_adapters,
    load_adapter,
    merge_adapters,
    save_adapter,
    unmerge_adapters,
)

peft = pytest.importorskip("peft")  # a test-only dependency: automodel-core never imports it

# model -> (targets incl. the experts' per-expert names, expert module on disk for expert 3, layer 1)
CASES = {
    "mixtral": (["w1", "w2", "w3", "q_proj"], "model.layers.1.block_sparse_moe.experts.3.w1"),
    "qwen3_moe": (
        ["gate_proj", "up_proj", "down_proj", "v_proj"],
        "model.layers.1.mlp.experts.3.gate_proj",
    ),
}


def _ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(6, 384, (2, 12), generator=torch.Generator().manual_seed(seed))


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_expert_adapters_load_in_peft_and_back_with_identical_outputs(
    name, tiny_model_dir, tmp_path
):
    targets, expert_key = CASES[name]
    base_dir = tiny_model_dir(name)
    torch.manual_seed(0)
    config = LoraConfig(rank=4, alpha=8, target_modules=targets, init="random")
    model = apply_peft(AutoModelForCausalLM.from_pretrained(base_dir), config)
    experts = expert_adapters(model)
    assert len(experts) == model.config.num_hidden_layers
    assert all(lora.projections == ("gate", "up", "down") for lora in experts.values())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_parameters(model))
    assert all(".lora_" in n for n in trainable)

    ids = _ids()
    model(input_ids=ids, labels=ids).loss.backward()  # the grouped forward trains the adapter
    lora = next(iter(experts.values()))
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.parameters())
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    save_adapter(model, tmp_path)

    files = load_file(str(tmp_path / "adapter_model.safetensors"))
    hidden, inter = model.config.hidden_size, lora.lora_A_down.shape[-1]
    assert files[f"base_model.model.{expert_key}.lora_A.weight"].shape == (4, hidden)
    assert files[f"base_model.model.{expert_key}.lora_B.weight"].shape == (inter, 4)
    torch.testing.assert_close(
        files[f"base_model.model.{expert_key}.lora_A.weight"], lora_of(model, 1).lora_A_gate[3]
    )
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert expert_key in saved["target_modules"]

    plain = transformers.AutoModelForCausalLM.from_pretrained(base_dir)
    with torch.no_grad():
        before = plain(input_ids=ids).logits
        theirs = peft.PeftModel.from_pretrained(plain, tmp_path).eval()(input_ids=ids).logits
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=0)
    assert (ours - before).abs().max() > 1e-2  # the adapter really changes the outputs

    again = load_adapter(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path).eval()
    with torch.no_grad():
        torch.testing.assert_close(again(input_ids=ids).logits, ours, atol=1e-6, rtol=0)


def lora_of(model, layer: int):
    return expert_adapters(model)[f"model.layers.{layer}.mlp.experts"]


@pytest.mark.slow
def test_expert_adapters_merge_unmerge_and_refusals(tiny_model_dir):
    base_dir = tiny_model_dir("qwen3_moe")
    config = LoraConfig(rank=4, alpha=8, target_modules=["gate_proj", "up_proj"], init="random")
    model = apply_peft(AutoModelForCausalLM.from_pretrained(base_dir), config).eval()
    assert lora_of(model, 0).projections == ("gate", "up")
    ids = _ids(1)
    with torch.no_grad():
        adapted = model(input_ids=ids).logits
        weights = model.model.layers[0].mlp.experts.gate_up_proj.clone()
        merge_adapters(model)
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, atol=1e-5, rtol=0)
        unmerge_adapters(model)
        torch.testing.assert_close(model.model.layers[0].mlp.experts.gate_up_proj, weights)
        merge_adapters(model, unload=True)
        assert not expert_adapters(model)
        torch.testing.assert_close(model(input_ids=ids).logits, adapted, atol=1e-5, rtol=0)

    fresh = AutoModelForCausalLM.from_pretrained(base_dir)
    with pytest.raises(ValueError, match="DoRA"):
        apply_peft(fresh, LoraConfig(target_modules=["down_proj"], use_dora=True))
    one_expert = r"model\.layers\.0\.mlp\.experts\.3\.down_proj"
    with pytest.raises(ValueError, match="all experts of a layer or none"):
        apply_peft(fresh, LoraConfig(target_modules=one_expert))


@pytest.mark.gpu
def test_expert_adapters_bf16_on_gpu_match_fp32():
    """The grouped forward with expert LoRA (``torch._grouped_mm`` on Hopper) in bf16 against fp32."""
    from automodel.core.moe import is_experts_module
    from harness.models import build_tiny_model

    model = build_tiny_model("qwen3_moe")
    config = LoraConfig(rank=8, alpha=16, target_modules="all-linear", init="random")
    apply_peft(model, config)
    experts = next(m for m in model.modules() if is_experts_module(m)).cuda()
    gen = torch.Generator().manual_seed(0)
    num_experts, _, hidden = experts.gate_up_proj.shape
    x = torch.randn(256, hidden, generator=gen)
    index = torch.rand(256, num_experts, generator=gen).argsort(dim=-1)[:, :2].cuda()
    weights = torch.rand(256, 2, generator=gen).softmax(dim=-1)
    results = {}
    for dtype in (torch.float32, torch.bfloat16):
        experts.to(dtype)
        experts.zero_grad(set_to_none=True)
        out = experts(x.cuda().to(dtype), index, weights.cuda().to(dtype))
        out.float().square().sum().backward()
        grads = {n: p.grad.float().clone() for n, p in experts.lora.named_parameters()}
        results[dtype] = (out.float(), grads)
    (ref, ref_grads), (got, got_grads) = results[torch.float32], results[torch.bfloat16]
    assert torch.isfinite(got).all()
    assert ((got - ref).norm() / ref.norm()).item() < 1e-2
    for name, grad in got_grads.items():
        rel = ((grad - ref_grads[name]).norm() / ref_grads[name].norm()).item()
        assert rel < 2e-2, (name, rel)
