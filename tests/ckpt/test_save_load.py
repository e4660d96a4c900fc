"""Single-process save/load: HF layout, tied weights, dtypes, key maps, strict errors, DCP format."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors import safe_open

from automodel.ckpt import CheckpointError, KeyMap, load, save
from harness.models import build_tiny_model

TOKENS = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 11]])


def _logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(TOKENS).logits


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_roundtrip_tied_sharded_loads_in_transformers(tmp_path, dtype):
    model = build_tiny_model("llama", dtype=dtype)  # tied embeddings
    out = save(model, tmp_path / "ckpt", max_shard_size="40KB")

    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert "lm_head.weight" not in index["weight_map"]  # tied: stored once, HF convention
    for name in files:
        with safe_open(out / name, framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            names = f.keys()  # safe_open is not iterable
            for key in names:
                assert f.get_tensor(key).dtype == dtype
                assert index["weight_map"][key] == name
    assert index["metadata"]["total_size"] == sum(
        p.numel() * p.element_size() for p in model.parameters()
    )

    reloaded = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=dtype)
    torch.testing.assert_close(_logits(reloaded), _logits(model), rtol=0, atol=0)

    fresh = build_tiny_model("llama", seed=1, dtype=dtype)
    result = load(fresh, out)
    assert result.missing_keys == [] and result.unexpected_keys == []
    assert fresh.lm_head.weight is fresh.model.embed_tokens.weight
    torch.testing.assert_close(_logits(fresh), _logits(model), rtol=0, atol=0)


def test_dtype_cast_on_save_and_on_load(tmp_path):
    model = build_tiny_model("qwen3")  # untied
    out = save(model, tmp_path / "bf16", dtype="bf16")
    with safe_open(out / "model.safetensors", framework="pt") as f:
        names = f.keys()  # safe_open is not iterable
        assert {f.get_tensor(k).dtype for k in names} == {torch.bfloat16}
        assert "lm_head.weight" in names
    fp32 = build_tiny_model("qwen3", seed=3)
    load(fp32, out)
    for (name, p), q in zip(model.named_parameters(), fp32.parameters()):
        torch.testing.assert_close(q, p.to(torch.bfloat16).float(), rtol=0, atol=0, msg=name)
    as_bf16 = build_tiny_model("qwen3", seed=3)
    load(as_bf16, save(model, tmp_path / "fp32"), dtype=torch.bfloat16)
    assert as_bf16.lm_head.weight.dtype == torch.bfloat16
    torch.testing.assert_close(as_bf16.lm_head.weight, model.lm_head.weight.bfloat16())


def test_loads_folder_written_by_save_pretrained(tiny_model_dir):
    src = tiny_model_dir("mistral", max_shard_size="30KB")
    reference = transformers.AutoModelForCausalLM.from_pretrained(src)
    model = build_tiny_model("mistral", seed=5)
    load(model, src)
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=0, atol=0)


class _FusedQKV(KeyMap):
    """In memory: ``attn.qkv`` (q, k, v stacked on dim 0) and ``body.*``; on disk: HF names."""

    def hf_name(self, name):
        return None if name.endswith("qkv") else name.replace("body.", "model.")

    def to_hf(self, name, tensor):
        q, k, v = tensor.split([4, 2, 2])
        base = name.replace("body.", "model.").removesuffix("qkv")
        return [
            (base + "q_proj.weight", q),
            (base + "k_proj.weight", k),
            (base + "v_proj.weight", v),
        ]

    def from_hf(self, name, read):
        base = name.replace("body.", "model.").removesuffix("qkv")
        return torch.cat([read(base + f"{p}_proj.weight") for p in "qkv"])


def test_key_map_renames_and_splits_fused_tensors(tmp_path):
    state = {"body.attn.qkv": torch.randn(8, 3), "body.norm": torch.randn(3)}
    out = save(state, tmp_path / "fused", key_map=_FusedQKV())
    with safe_open(out / "model.safetensors", framework="pt") as f:
        assert sorted(f.keys()) == [
            "model.attn.k_proj.weight",
            "model.attn.q_proj.weight",
            "model.attn.v_proj.weight",
            "model.norm",
        ]
        torch.testing.assert_close(
            f.get_tensor("model.attn.k_proj.weight"), state["body.attn.qkv"][4:6]
        )
    target = {k: torch.zeros_like(v) for k, v in state.items()}
    assert load(target, out, key_map=_FusedQKV()).unexpected_keys == []
    torch.testing.assert_close(target, state, rtol=0, atol=0)

    renamed = {"m.w": torch.zeros(4, 3)}
    result = load(renamed, out, key_map={"m.w": "model.attn.q_proj.weight"}, strict=False)
    assert len(result.unexpected_keys) == 3
    torch.testing.assert_close(renamed["m.w"], state["body.attn.qkv"][:4], rtol=0, atol=0)


def test_strict_errors_name_keys_and_shapes(tmp_path):
    out = save({"a": torch.ones(2, 3), "b": torch.ones(4)}, tmp_path / "ab")
    with pytest.raises(CheckpointError, match=r"1 missing key\(s\): c; 1 unexpected key\(s\): b"):
        load({"a": torch.zeros(2, 3), "c": torch.zeros(4)}, out)
    partial = {"a": torch.zeros(2, 3), "c": torch.zeros(4)}
    result = load(partial, out, strict=False)
    assert (result.missing_keys, result.unexpected_keys) == (["c"], ["b"])
    assert float(partial["a"].sum()) == 6.0
    with pytest.raises(
        CheckpointError, match=r"'a': checkpoint 'a' has shape \[2, 3\], the target \[3, 2\]"
    ):
        load({"a": torch.zeros(3, 2), "b": torch.zeros(4)}, out)
    with pytest.raises(CheckpointError, match="does not exist"):
        load({"a": torch.zeros(2, 3)}, tmp_path / "nope")


def test_dcp_format_roundtrip_and_errors(tmp_path):
    model = build_tiny_model("qwen2")
    out = save(model, tmp_path / "dcp", format="dcp")
    assert (out / ".metadata").is_file() and (out / "config.json").is_file()
    fresh = build_tiny_model("qwen2", seed=9)
    load(fresh, out)
    torch.testing.assert_close(_logits(fresh), _logits(model), rtol=0, atol=0)
    with pytest.raises(CheckpointError, match="unexpected key"):
        load({"model.norm.weight": torch.zeros(64)}, out)
