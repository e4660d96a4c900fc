"""CheckpointManager in one process: exact resume, retention, async save, extra objects, errors."""

from __future__ import annotations

import json
import random

import pytest
import torch
import transformers

from automodel.ckpt import CheckpointError, CheckpointManager
from harness.models import build_tiny_model


class _Counter:
    """A user object with state_dict/load_state_dict (like a dataloader)."""

    def __init__(self) -> None:
        self.position = 0

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.position = state["position"]


def _setup(seed: int):
    model = build_tiny_model("llama", seed=seed).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)
    return model, optimizer, scheduler, _Counter()


def _step(model, optimizer, scheduler, counter) -> float:
    # Batch and dropout-free loss both depend on the RNG state, so a resume must restore it.
    tokens = torch.randint(0, 384, (2, 12))
    loss = model(tokens, labels=tokens).loss
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    scheduler.step()
    counter.position += random.randint(1, 5)
    return loss.item()


@pytest.mark.parametrize("async_save", [False, True])
def test_resume_reproduces_next_step_exactly(tmp_path, async_save):
    torch.manual_seed(0)
    random.seed(0)
    model, optimizer, scheduler, counter = _setup(seed=0)
    manager = CheckpointManager(tmp_path / "run", keep_last=2, async_save=async_save)
    for step in range(1, 4):
        _step(model, optimizer, scheduler, counter)
        manager.save(
            step,
            model=model,
            optimizer=optimizer,
            extra={"scheduler": scheduler, "data": counter, "tokens": step * 24},
        )
    manager.wait()
    expected = [_step(model, optimizer, scheduler, counter) for _ in range(2)]
    expected_position = counter.position

    assert manager.steps() == [2, 3] and manager.latest() == 3  # keep_last=2
    assert (tmp_path / "run" / "latest").read_text().strip() == "step_3"

    model2, optimizer2, scheduler2, counter2 = _setup(seed=1)
    extra = {"scheduler": scheduler2, "data": counter2, "tokens": 0}
    resumed = CheckpointManager(tmp_path / "run")
    assert resumed.load("latest", model=model2, optimizer=optimizer2, extra=extra) == 3
    assert extra["tokens"] == 72 and scheduler2.last_epoch == 3
    got = [_step(model2, optimizer2, scheduler2, counter2) for _ in range(2)]
    assert got == expected  # bit-identical losses
    assert counter2.position == expected_position

    # Every training checkpoint is a transformers folder.
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "step_3")
    marker = json.loads((tmp_path / "run" / "step_3" / "checkpoint.json").read_text())
    assert marker["step"] == 3 and marker["optimizer"]
    assert hf.config.num_hidden_layers == 2


def test_retention_pointer_and_errors(tmp_path):
    manager = CheckpointManager(tmp_path / "r", keep_last=1)
    assert manager.latest() is None
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        manager.load("latest", model={"w": torch.zeros(2)})
    state = {"w": torch.arange(4.0)}
    for step in (5, 7, 6):  # latest is the last saved, not the largest step
        manager.save(step, model=state)
    assert manager.latest() == 6 and manager.steps() == [6]
    manager.save(6, model={"w": torch.ones(4)})  # re-saving a step replaces it
    target = {"w": torch.zeros(4)}
    manager.load(6, model=target)
    assert target["w"].tolist() == [1.0, 1.0, 1.0, 1.0]
    with pytest.raises(CheckpointError, match=r"not a complete checkpoint; complete steps: \[6\]"):
        manager.load(5, model=target)
    with pytest.raises(CheckpointError, match="keep_last=0"):
        CheckpointManager(tmp_path / "x", keep_last=0)
    (tmp_path / "r" / "latest").unlink()  # pointer lost: fall back to the newest complete step
    assert manager.latest() == 6
    (tmp_path / "r" / ".partial.step_9").mkdir()
    CheckpointManager(tmp_path / "r")  # a new run cleans up leftovers of a crashed save
    assert not (tmp_path / "r" / ".partial.step_9").exists()
