"""Training checkpoints: model, optimizer, scheduler, data position, RNG; atomic, with `latest`.

This module is the single place that talks to checkpoint storage, so moving to automodel-ckpt's
``CheckpointManager`` touches nothing else. Layout: ``<root>/step_<N>/`` with ``model.pt``,
``optim.pt`` and one ``rank<r>.pt`` per rank (data position and RNG differ per rank), written
under a temporary name and renamed when complete; ``<root>/latest`` names the newest one.
"""

from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from automodel.recipes.train._runtime import Runtime


def rng_state() -> dict[str, Any]:
    """Returns the RNG states of python, torch CPU and (when present) CUDA."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores RNG states saved by :func:`rng_state`."""
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class TrainingCheckpoints:
    """Saves and restores full training state under ``root`` keeping the newest ``keep_last``."""

    def __init__(self, root: str | Path, rt: Runtime, keep_last: int = 2) -> None:
        self.root = Path(root)
        self.rt = rt
        self.keep_last = keep_last

    def latest(self) -> int | None:
        """Returns the newest complete step, or None when there is none."""
        pointer = self.root / "latest"
        if not pointer.is_file():
            return None
        step = int(pointer.read_text().strip())
        return step if (self.root / f"step_{step}").is_dir() else None

    def save(
        self, step: int, model: torch.nn.Module, optimizer: Any, extra: dict[str, Any]
    ) -> Path:
        """Writes step ``step`` atomically; returns its folder. Collective: every rank calls it."""
        final = self.root / f"step_{step}"
        tmp = self.root / f".step_{step}.tmp"
        if self.rt.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self._barrier()
        if self.rt.is_main:
            torch.save(model.state_dict(), tmp / "model.pt")
            torch.save(optimizer.state_dict(), tmp / "optim.pt")
        torch.save({**extra, "rng": rng_state()}, tmp / f"rank{self.rt.rank}.pt")
        self._barrier()
        if self.rt.is_main:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            pointer_tmp = self.root / ".latest.tmp"
            pointer_tmp.write_text(str(step))
            os.replace(pointer_tmp, self.root / "latest")
            self._prune()
        self._barrier()
        return final

    def load(self, step: int, model: torch.nn.Module, optimizer: Any) -> dict[str, Any]:
        """Restores model, optimizer and RNG from ``step``; returns this rank's ``extra`` dict."""
        folder = self.root / f"step_{step}"
        model.load_state_dict(torch.load(folder / "model.pt", map_location=self.rt.device))
        optimizer.load_state_dict(torch.load(folder / "optim.pt", map_location=self.rt.device))
        extra = torch.load(folder / f"rank{self.rt.rank}.pt", weights_only=False)
        set_rng_state(extra.pop("rng"))
        return extra  # type: ignore[no-any-return]

    def _prune(self) -> None:
        steps = sorted(int(p.name[5:]) for p in self.root.glob("step_*") if p.name[5:].isdigit())
        for old in steps[: -self.keep_last]:
            shutil.rmtree(self.root / f"step_{old}", ignore_errors=True)

    def _barrier(self) -> None:
        if self.rt.distributed:
            dist.barrier()
