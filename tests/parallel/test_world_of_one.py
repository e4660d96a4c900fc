"""init_distributed() without torchrun: a world of 1 where parallelize() still applies AC.

Runs in the pytest process (no launch): the in-memory world of 1 is destroyed at the end.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from torch import nn

from automodel.parallel import ParallelConfig, build_mesh, init_distributed, parallelize


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stack = nn.ModuleList([_Block() for _ in range(3)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.stack:
            x = block(x)
        return x.square().mean()


def test_world_of_one_without_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert not dist.is_initialized()
    try:
        assert init_distributed() == 0
        assert init_distributed() == 0  # idempotent
        assert dist.get_world_size() == 1
        torch.manual_seed(0)
        ref, model = _Net(), _Net()
        model.load_state_dict(ref.state_dict())
        config = ParallelConfig(activation_checkpointing="full")
        mesh = build_mesh(config, device_type="cpu")
        assert mesh.size() == 1 and mesh["dp"].size() == 1
        parallelize(model, config, mesh, blocks="stack")
        assert [n for n, _ in model.named_parameters()] == [n for n, _ in ref.named_parameters()]
        x = torch.randn(4, 8)
        ref(x).backward()
        model(x).backward()
        for a, b in zip(ref.parameters(), model.parameters(), strict=True):
            assert a.grad is not None and b.grad is not None
            assert torch.equal(a.grad, b.grad)
        with pytest.raises(ValueError, match=r"blocks='nope' is not an nn\.ModuleList"):
            parallelize(_Net(), config, mesh, blocks="nope")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
