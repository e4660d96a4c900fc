"""LoraLinear and apply_peft on their own: math, merge/unmerge, configuration errors, the save hook."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from torch.distributed.tensor import Replicate, Shard
from transformers import AutoModelForCausalLM

from automodel.core.peft import (
    LoraConfig,
    LoraLinear,
    adapter_modules,
    adapter_placements,
    apply_peft,
    merge_adapters,
    reset_adapters,
    save_pretrained_adapter,
    unmerge_adapters,
)
from harness.models import VOCAB_SIZE, build_tiny_model, tiny_config


def test_lora_linear_computes_the_lora_formula():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoraLinear(base, rank=4, alpha=8, init="random", use_rslora=True)
    assert layer.weight is base.weight and layer.bias is base.bias
    x = torch.randn(3, 5, 16)
    expected = base(x) + (x @ layer.lora_A.T @ layer.lora_B.T) * (8 / math.sqrt(4))
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)


def test_dora_computes_the_dora_formula():
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    layer = LoraLinear(base, rank=4, alpha=4, use_dora=True, init="random")
    with torch.no_grad():
        layer.lora_magnitude_vector.mul_(torch.linspace(0.5, 1.5, 8))
    adapted = base.weight + layer.lora_B @ layer.lora_A
    direction = adapted / adapted.norm(dim=1, keepdim=True)
    expected_weight = layer.lora_magnitude_vector[:, None] * direction
    x = torch.randn(6, 16)
    torch.testing.assert_close(layer(x), x @ expected_weight.T + base.bias, atol=1e-5, rtol=0)


@pytest.mark.parametrize("init", ["default", "gaussian"])
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_fresh_adapter_is_the_identity(init, use_dora):
    torch.manual_seed(0)
    base = nn.Linear(16, 8)
    x = torch.randn(4, 16)
    expected = base(x)
    layer = LoraLinear(base, rank=4, alpha=8, init=init, use_dora=use_dora)
    torch.testing.assert_close(layer(x), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_merge_and_unmerge(use_dora, tmp_path):
    model = build_tiny_model("llama")
    original = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(1)
    apply_peft(model, LoraConfig(rank=4, alpha=8, use_dora=use_dora, init="random"))
    ids = torch.randint(5, VOCAB_SIZE, (2, 10))
    with torch.no_grad():
        base_logits = build_tiny_model("llama")(ids).logits
        unmerged = model(ids).logits
        assert (unmerged - base_logits).abs().max() > 1e-2

        merge_adapters(model)
        assert all(m.merged for m in adapter_modules(model).values())
        torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=1e-5)

        unmerge_adapters(model)
        for key, value in model.state_dict().items():
            if ".lora_" not in key:
                torch.testing.assert_close(value, original[key], atol=1e-6, rtol=0)
        torch.testing.assert_close(model(ids).logits, unmerged, atol=1e-5, rtol=1e-5)

        # unload: a standard transformers model again, saved and reloaded with plain transformers.
        merge_adapters(model, unload=True)
        assert not adapter_modules(model)
        assert set(model.state_dict()) == set(original)
        assert not save_pretrained_adapter(model, tmp_path / "unused")
        model.save_pretrained(tmp_path)
        reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
        torch.testing.assert_close(reloaded(ids).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_save_pretrained_hook_writes_adapter_files_only(tmp_path):
    model = build_tiny_model("qwen3")
    assert save_pretrained_adapter(model, tmp_path / "plain") is False
    assert not (tmp_path / "plain").exists()
    apply_peft(model, LoraConfig(target_modules=["q_proj"], use_dora=True))
    assert save_pretrained_adapter(model, tmp_path / "adapted") is True
    assert sorted(p.name for p in (tmp_path / "adapted").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    tensors = load_file(str(tmp_path / "adapted" / "adapter_model.safetensors"))
    assert len(tensors) == 3 * model.config.num_hidden_layers


def test_apply_peft_changes_nothing_but_the_targets():
    model = build_tiny_model("llama")
    keys = set(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    apply_peft(model, {"rank": 2, "target_modules": ["gate_proj"]})
    # Base keys and parameter objects are untouched (a full checkpoint still has HF keys).
    state = model.state_dict()
    assert set(state) - keys == {
        f"model.layers.{i}.mlp.gate_proj.lora_{ab}" for i in range(2) for ab in "AB"
    }
    for name, param in model.named_parameters():
        if ".lora_" not in name:
            assert param is params[name] and not param.requires_grad


def test_configuration_errors_name_the_fix():
    with pytest.raises(ValueError, match="rank=0"):
        LoraConfig(rank=0)
    with pytest.raises(ValueError, match="dropout"):
        LoraConfig(dropout=1.0)
    with pytest.raises(ValueError, match="init"):
        LoraConfig(init="xavier")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="quantize_base"):
        LoraConfig(quantize_base="int8")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="non-empty list"):
        LoraConfig(target_modules=[])
    model = build_tiny_model("llama")
    with pytest.raises(ValueError, match=r"matches no linear layer.*q_proj"):
        apply_peft(model, LoraConfig(target_modules=["query_key_value"]))
    with pytest.raises(ValueError, match=r"LoRA adapts nn\.Linear layers only"):
        apply_peft(model, LoraConfig(target_modules=["mlp"]))
    assert not any(
        p.requires_grad is False for p in model.parameters()
    )  # failed calls froze nothing
    apply_peft(model, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        apply_peft(model, LoraConfig(target_modules=["v_proj"]))
    with pytest.raises(ValueError, match=r"plain torch\.nn\.Linear"):
        LoraLinear(LoraLinear(nn.Linear(4, 4), rank=1, alpha=1), rank=1, alpha=1)


def test_qlora_without_gpu_or_bitsandbytes_is_an_explicit_error():
    if torch.cuda.is_available():
        pytest.skip("covered by the gpu test")
    model = build_tiny_model("llama")
    with pytest.raises((ImportError, ValueError), match=r"quantize_base='nf4'.*(bitsandbytes|GPU)"):
        apply_peft(model, LoraConfig(target_modules=["q_proj"], quantize_base="nf4"))


def test_adapter_placements_follow_the_base_weight():
    # Column-wise TP shards the weight's output dim, row-wise its input dim.
    assert adapter_placements("lora_A", [Shard(0)]) == (Replicate(),)
    assert adapter_placements("lora_B", [Shard(0)]) == (Shard(0),)
    assert adapter_placements("lora_magnitude_vector", [Shard(0)]) == (Shard(0),)
    assert adapter_placements("lora_A", [Shard(1)]) == (Shard(1),)
    assert adapter_placements("lora_A", [Shard(-1)]) == (Shard(1),)
    assert adapter_placements("lora_B", [Shard(1)]) == (Replicate(),)
    assert adapter_placements("lora_B", [Replicate(), Shard(0)]) == (Replicate(), Shard(0))


@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_adapters_of_a_meta_built_model_initialize_after_loading(use_dora):
    config = LoraConfig(rank=4, init="random", use_dora=use_dora)
    real = reset_adapters(apply_peft(build_tiny_model("llama"), config), seed=3)
    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(tiny_config("llama"))
    apply_peft(meta, config)
    assert all(p.is_meta for n, p in meta.named_parameters() if ".lora_" in n)
    meta.to_empty(device="cpu")
    missing, _ = meta.load_state_dict(build_tiny_model("llama").state_dict(), strict=False)
    assert missing and all(".lora_" in k for k in missing)
    reset_adapters(meta, seed=3)
    expected = {k: v for k, v in real.state_dict().items() if ".lora_" in k}
    got = {k: v for k, v in meta.state_dict().items() if ".lora_" in k}
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, atol=0, rtol=0)
