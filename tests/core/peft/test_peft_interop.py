"""LoRA / DoRA against the Hugging Face peft library: same outputs, same training, same files.

Every comparison runs real transformers models from the harness in fp32 on CPU, and the real peft
library (only a test dependency of automodel-core).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from automodel.core.peft import (
    LoraConfig,
    LoraLinear,
    adapter_modules,
    adapter_parameters,
    apply_peft,
    find_target_modules,
    load_adapter,
    save_adapter,
)
from harness.models import VOCAB_SIZE, build_tiny_model

peft = pytest.importorskip("peft")  # a test-only dependency: automodel-core never imports it

ATOL = 1e-6


def _batches(n: int, seed: int = 0, batch: int = 2, seq: int = 12) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(5, VOCAB_SIZE, (batch, seq), generator=g)
        mask = torch.ones_like(ids)
        mask[0, :3] = 0  # left padding on one row: masks must flow through the adapted layers
        labels = ids.masked_fill(mask == 0, -100)
        out.append({"input_ids": ids, "attention_mask": mask, "labels": labels})
    return out


def _train(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> list[float]:
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    losses = []
    for batch in batches:
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    model.eval()
    return losses


@torch.no_grad()
def _logits(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "config"),
    [
        ("llama", LoraConfig(rank=4, alpha=8, dropout=0.1, target_modules=["q_proj", "v_proj"])),
        ("qwen3", LoraConfig(rank=4, alpha=8, target_modules="all-linear", use_rslora=True)),
        ("qwen3", LoraConfig(rank=4, alpha=6, target_modules=r".*mlp\..*_proj", use_dora=True)),
    ],
    ids=["llama-patterns-dropout", "qwen3-all-linear-rslora", "qwen3-regex-dora"],
)
def test_trained_adapter_loads_in_peft_with_identical_outputs(
    name, config, tiny_model_dir, tmp_path
):
    base_dir = tiny_model_dir(name)
    model = apply_peft(AutoModelForCausalLM.from_pretrained(base_dir), config)

    # Only the adapter trains; the output layer is never adapted by "all-linear".
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(adapter_parameters(model))
    assert trainable and all(".lora_" in n for n in trainable)
    assert not isinstance(model.lm_head, LoraLinear)
    wrapped = set(adapter_modules(model))
    if config.target_modules == "all-linear":
        assert len(wrapped) == 7 * model.config.num_hidden_layers
    batches = _batches(4)
    before = _logits(model, batches[0])
    torch.testing.assert_close(
        before, _logits(AutoModelForCausalLM.from_pretrained(base_dir), batches[0])
    )

    losses = _train(model, [batches[1]] * 3)  # one batch thrice: the loss must go down
    assert losses[-1] < losses[0]
    after = _logits(model, batches[3])
    save_adapter(model, tmp_path)

    files = load_file(str(tmp_path / "adapter_model.safetensors"))
    expected_keys = {f"base_model.model.{m}.lora_{ab}.weight" for m in wrapped for ab in "AB"}
    if config.use_dora:
        expected_keys |= {f"base_model.model.{m}.lora_magnitude_vector" for m in wrapped}
    assert set(files) == expected_keys
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["peft_type"] == "LORA" and saved["task_type"] == "CAUSAL_LM"
    assert saved["r"] == 4 and saved["lora_alpha"] == config.alpha
    assert saved["use_dora"] is config.use_dora and saved["use_rslora"] is config.use_rslora
    assert saved["base_model_name_or_path"] == str(base_dir)
    assert sorted(saved["target_modules"]) == sorted(wrapped)

    plain_base = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = peft.PeftModel.from_pretrained(plain_base, tmp_path)
    torch.testing.assert_close(_logits(peft_model, batches[3]), after, atol=ATOL, rtol=0)
    assert (after - before).abs().max() > 1e-3  # the trained adapter really changes the outputs


@pytest.mark.slow
@pytest.mark.parametrize("use_dora", [False, True], ids=["lora", "dora"])
def test_peft_adapter_loads_and_trains_identically(use_dora, tmp_path):
    """An adapter written by peft loads with identical outputs, and training stays in lockstep."""
    torch.manual_seed(0)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "down_proj"]
    peft_model = peft.get_peft_model(
        build_tiny_model("llama"),
        peft.LoraConfig(
            r=4, lora_alpha=8, target_modules=targets, use_dora=use_dora, init_lora_weights=False
        ),
    )
    peft_model.save_pretrained(tmp_path)
    ours = load_adapter(build_tiny_model("llama"), tmp_path)

    assert {n for n, p in ours.named_parameters() if p.requires_grad} == {
        n.removeprefix("base_model.model.").replace(".default", "").removesuffix(".weight")
        for n, p in peft_model.named_parameters()
        if p.requires_grad
    }
    batches = _batches(4, seed=1)
    torch.testing.assert_close(
        _logits(ours, batches[0]), _logits(peft_model, batches[0]), atol=ATOL, rtol=0
    )

    ours_losses, peft_losses = _train(ours, batches[:3]), _train(peft_model, batches[:3])
    torch.testing.assert_close(ours_losses, peft_losses, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(
        _logits(ours, batches[3]), _logits(peft_model, batches[3]), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize(
    "targets",
    [
        "all-linear",
        ["q_proj", "v_proj"],
        ["mlp.down_proj", "layers.1.self_attn.o_proj"],
        r"model\.layers\.0\..*_proj",
    ],
)
def test_target_matching_follows_peft(targets):
    is_regex = isinstance(targets, str) and targets != "all-linear"
    excludes = None if is_regex else ["layers.0.mlp.up_proj"]
    ours = find_target_modules(
        build_tiny_model("qwen3"), LoraConfig(target_modules=targets, exclude_modules=excludes)
    )
    reference = peft.get_peft_model(
        build_tiny_model("qwen3"),
        peft.LoraConfig(
            target_modules=targets if isinstance(targets, str) else list(targets),
            exclude_modules=excludes,
        ),
    )
    theirs = {
        n.removeprefix("base_model.model.")
        for n, m in reference.named_modules()
        if isinstance(m, peft.tuners.lora.LoraLayer)
    }
    assert set(ours) == theirs
    assert "lm_head" not in ours


def test_all_linear_skips_classifier_head():
    model = build_tiny_model("bert")
    names = find_target_modules(model, LoraConfig())
    assert "classifier" not in names
    assert "bert.encoder.layer.0.attention.self.query" in names


def test_task_type_follows_the_model_class(tmp_path):
    model = apply_peft(build_tiny_model("bert"), LoraConfig(target_modules=["query", "value"]))
    save_adapter(model, tmp_path / "cls", base_model_name_or_path="tiny-bert")
    saved = json.loads((tmp_path / "cls" / "adapter_config.json").read_text())
    assert saved["task_type"] is None and saved["base_model_name_or_path"] == "tiny-bert"
    explicit = LoraConfig(target_modules=["query"], task_type="FEATURE_EXTRACTION")
    save_adapter(apply_peft(build_tiny_model("bert"), explicit), tmp_path / "fe")
    saved = json.loads((tmp_path / "fe" / "adapter_config.json").read_text())
    assert saved["task_type"] == "FEATURE_EXTRACTION"


def test_config_from_peft_object_and_dict():
    reference = peft.LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.05, target_modules=["q_proj"], use_dora=True
    )
    config = LoraConfig.from_peft(reference)
    assert (config.rank, config.alpha, config.dropout, config.use_dora) == (16, 32.0, 0.05, True)
    assert config.target_modules == ["q_proj"]
    assert LoraConfig.from_peft(reference.to_dict()) == config
    model = apply_peft(build_tiny_model("llama"), reference)  # a peft config object is accepted
    assert all(m.use_dora and m.rank == 16 for m in adapter_modules(model).values())
    assert len(adapter_modules(model)) == model.config.num_hidden_layers
    with pytest.raises(ValueError, match="rank_pattern"):
        LoraConfig.from_peft({**reference.to_dict(), "rank_pattern": {"q_proj": 8}})
    with pytest.raises(ValueError, match="LoRA / DoRA adapters only"):
        LoraConfig.from_peft({"peft_type": "IA3", "target_modules": ["q_proj"]})


def test_load_adapter_rejects_an_adapter_of_another_shape(tmp_path):
    peft.get_peft_model(
        build_tiny_model("llama"), peft.LoraConfig(r=4, target_modules=["q_proj"])
    ).save_pretrained(tmp_path)
    model = apply_peft(build_tiny_model("llama"), LoraConfig(rank=2, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="shape"):
        load_adapter(model, tmp_path)
    other = apply_peft(build_tiny_model("llama"), LoraConfig(rank=4, target_modules=["k_proj"]))
    with pytest.raises(ValueError, match="match no adapted layer"):
        load_adapter(other, tmp_path)
    with pytest.raises(ValueError, match=r"adapter_config\.json not found"):
        load_adapter(build_tiny_model("llama"), Path(tmp_path) / "nowhere")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["llama", "qwen3"])
def test_adapter_of_automodel_optimized_model_loads_in_peft(name, tiny_model_dir, tmp_path):
    """``AutoModelForCausalLM.from_pretrained(..., peft=)`` keeps HF module names: peft loads it."""
    from automodel.core import AutoModelForCausalLM as OptimizedAutoModel

    base_dir = tiny_model_dir(name)
    torch.manual_seed(0)
    model = OptimizedAutoModel.from_pretrained(base_dir, peft=LoraConfig(rank=4, init="random"))
    assert len(adapter_modules(model)) == 7 * model.config.num_hidden_layers
    save_adapter(model, tmp_path)
    reference = peft.PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base_dir), tmp_path
    )
    batch = _batches(1, seed=2)[0]
    torch.testing.assert_close(_logits(model, batch), _logits(reference, batch), atol=1e-5, rtol=0)
