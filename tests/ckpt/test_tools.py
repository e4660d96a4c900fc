"""Offline tools on tiny checkpoints: merge/reshard/convert/diff/verify/inspect, each result loading
in transformers with identical logits, and corruption caught by verify and by load."""

from __future__ import annotations

import json
import os
import re

import pytest
import torch
import transformers
from ckpt._damage import corrupt_copies

from automodel.ckpt import (
    CheckpointError,
    convert,
    diff,
    inspect,
    load,
    merge,
    reshard,
    save,
    verify,
)
from harness.models import build_tiny_model

TOKENS = torch.tensor([[1, 17, 42, 99, 7, 250, 3, 11]])


def _logits(folder) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        return model(TOKENS).logits


def test_merge_reshard_convert_chain_keeps_logits(tmp_path, tiny_model_dir):
    src = tiny_model_dir("qwen3", max_shard_size="30KB")  # untied, several shards + tokenizer
    reference = _logits(src)

    as_dcp = convert(src, tmp_path / "dcp", to="dcp")
    assert (as_dcp / ".metadata").is_file() and (as_dcp / "config.json").is_file()
    merged = merge(as_dcp, tmp_path / "merged")
    assert sorted(p.name for p in merged.glob("*.safetensors")) == ["model.safetensors"]
    for name in (
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        assert (merged / name).read_bytes() == (src / name).read_bytes(), name
    resharded = reshard(merged, tmp_path / "resharded", max_shard_size="20KB", checksums=True)
    index = json.loads((resharded / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3
    back = convert(resharded, tmp_path / "back", to="safetensors")

    for folder in (merged, resharded, back):
        torch.testing.assert_close(_logits(folder), reference, rtol=0, atol=0)
        assert diff(src, folder).equal
        assert verify(folder).ok
    assert diff(src, as_dcp).equal
    assert verify(resharded).checksums_checked == len(set(index["weight_map"].values())) + 1
    tokenizer = transformers.AutoTokenizer.from_pretrained(merged)
    assert tokenizer.chat_template is not None

    info = inspect(src)
    model = build_tiny_model("qwen3")
    assert info.num_parameters == sum(p.numel() for p in model.parameters())
    assert info.format == "safetensors" and len(info.files) > 1
    assert inspect(as_dcp).num_parameters == info.num_parameters

    bf16 = merge(src, tmp_path / "bf16", dtype="bfloat16")
    assert {t.dtype for t in inspect(bf16).tensors} == {"torch.bfloat16"}
    loose = diff(bf16, src, atol=1e-2, rtol=1e-2)
    assert loose.equal and not diff(bf16, src).equal
    assert all(t.dtype_a == "torch.bfloat16" for t in loose.tensors)


def test_diff_reports_keys_shapes_and_values(tmp_path):
    a = save({"w": torch.ones(4), "x": torch.zeros(2), "s": torch.ones(3)}, tmp_path / "a")
    b = save({"w": torch.ones(4) * 1.5, "y": torch.zeros(2), "s": torch.ones(2)}, tmp_path / "b")
    report = diff(a, b)
    assert report.only_in_a == ["x"] and report.only_in_b == ["y"]
    assert report.shape_mismatches == ["s: [3] vs [2]"]
    (w,) = report.tensors
    assert (w.max_abs, w.max_rel, w.equal) == (0.5, pytest.approx(1 / 3), False)
    assert not report.equal and json.dumps(report.as_dict())


def test_per_rank_sharded_safetensors_merge(tmp_path):
    """DCP's own HuggingFaceStorageWriter(save_distributed=True) layout is a merge source too."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import HuggingFaceStorageWriter

    state = {"a": torch.randn(6, 4), "b": torch.randn(3)}
    dcp.save(
        state,
        storage_writer=HuggingFaceStorageWriter(str(tmp_path / "ranks"), save_distributed=True),
        no_dist=True,
    )
    merged = merge(tmp_path / "ranks", tmp_path / "merged")
    assert diff(merged, save(state, tmp_path / "ref")).equal


def test_corruption_caught_by_verify_and_load(tmp_path, tiny_model_dir):
    src = tiny_model_dir("llama", max_shard_size="30KB")
    for name, (folder, message) in corrupt_copies(src, tmp_path).items():
        report = verify(folder)
        assert not report.ok, name
        assert any(re.search(message, p) for p in report.problems), (name, report)
        with pytest.raises(CheckpointError, match=message):
            load(build_tiny_model("llama"), folder)

    # Bytes flipped inside a tensor keep the structure valid: only the sha256 manifest sees it.
    signed = reshard(src, tmp_path / "signed", max_shard_size="30KB", checksums=True)
    assert verify(signed).ok
    victim = sorted(signed.glob("model-*.safetensors"))[0]
    with open(victim, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        f.write(b"\x00\x01\x02\x03")
    report = verify(signed)
    assert report.problems == [
        f"{victim.name}: sha256 differs from SHA256SUMS (corrupted after save)"
    ]


def test_destination_rules(tmp_path):
    src = save({"w": torch.ones(3)}, tmp_path / "src")
    merge(src, tmp_path / "out")
    with pytest.raises(CheckpointError, match="exists; pass overwrite=True"):
        merge(src, tmp_path / "out")
    merge(src, tmp_path / "out", overwrite=True)
    with pytest.raises(CheckpointError, match="inside the source"):
        merge(src, src / "nested")
    with pytest.raises(CheckpointError, match="contains the source"):
        merge(src, tmp_path, overwrite=True)
    assert (src / "model.safetensors").is_file()
    with pytest.raises(CheckpointError, match="unsupported dtype 'int3'"):
        merge(src, tmp_path / "x", dtype="int3")
    with pytest.raises(CheckpointError, match="'5XB' is not understood"):
        reshard(src, tmp_path / "x", max_shard_size="5XB")
    assert not (tmp_path / "x").exists()
