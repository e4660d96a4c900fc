"""Peak memory of the streaming tools on a checkpoint several times larger than the bound."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from automodel.ckpt import diff, save

pytestmark = pytest.mark.slow

TENSOR_BYTES = 2 << 20  # 2 MiB per tensor
NUM_TENSORS = 96  # 192 MiB checkpoint
SHARD = "16MiB"
BOUND = 48 << 20  # a quarter of the checkpoint: a few shards/tensors, never the whole model


def test_streaming_tools_stay_within_bound(tmp_path):
    tensors = {
        f"layers.{i}.weight": torch.full((TENSOR_BYTES // 4,), float(i)) for i in range(NUM_TENSORS)
    }
    src = save(tensors, tmp_path / "src", max_shard_size="64MiB")
    del tensors
    child = str(Path(__file__).with_name("_memory_child.py"))
    result = subprocess.run(
        [sys.executable, child, str(src), SHARD], capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    growth = json.loads(result.stdout.strip().splitlines()[-1])
    for step, grown in growth.items():
        assert grown < BOUND, f"{step}: peak RSS grew by {grown / 2**20:.1f} MiB"
    outputs = next(p for p in tmp_path.iterdir() if p.name != "src")
    assert diff(src, outputs / "merged").equal
    files = sorted((outputs / "copy").glob("*.safetensors"))
    # As in transformers, the limit counts tensor bytes (8 x 2 MiB per file), not the header.
    assert len(files) == 12 and all(f.stat().st_size <= (16 << 20) + 4096 for f in files)
