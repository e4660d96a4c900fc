"""init_distributed() without torchrun: a world of 1 where parallelize() still applies AC."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

_SCRIPT = r"""
import torch
from torch import nn
from automodel.parallel import ParallelConfig, build_mesh, init_distributed, parallelize

class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)
    def forward(self, x):
        return x + self.down(torch.relu(self.up(x)))

class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.stack = nn.ModuleList([Block() for _ in range(3)])
    def forward(self, x):
        for block in self.stack:
            x = block(x)
        return x.square().mean()

assert init_distributed() == 0
assert init_distributed() == 0  # idempotent
torch.manual_seed(0)
ref, model = Net(), Net()
model.load_state_dict(ref.state_dict())
config = ParallelConfig(activation_checkpointing="full")
mesh = build_mesh(config)
assert mesh.size() == 1 and mesh["dp"].size() == 1
parallelize(model, config, mesh, blocks="stack")
assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
x = torch.randn(4, 8)
ref(x).backward(); model(x).backward()
diff = max((a.grad - b.grad).abs().max().item() for a, b in zip(ref.parameters(), model.parameters()))
assert diff == 0.0, diff
try:
    parallelize(Net(), config, mesh, blocks="nope")
except ValueError as e:
    assert "blocks='nope' is not an nn.ModuleList" in str(e), e
else:
    raise AssertionError("no ValueError for a bad blocks name")
print("OK")
"""


@pytest.mark.slow
def test_world_of_one_without_torchrun() -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    done = subprocess.run(
        [sys.executable, "-c", _SCRIPT], env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("OK"), done.stderr[-3000:]
