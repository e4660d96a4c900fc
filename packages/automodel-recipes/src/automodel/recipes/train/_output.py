"""The run folder: what an existing one means (resume, refuse) and the `finished` marker."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from automodel.recipes.config import RecipeConfig


class RunError(RuntimeError):
    """The run cannot start or continue as configured; the message says why and what to change."""


class RunDir:
    """``training.output_dir``: config.yaml, metrics.jsonl, checkpoints/, the final model, FINISHED."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.checkpoints = self.root / "checkpoints"
        self.finished_marker = self.root / "FINISHED"

    def finished_step(self) -> int | None:
        """Returns the last step of a finished run in this folder, or None."""
        if not self.finished_marker.is_file():
            return None
        return int(json.loads(self.finished_marker.read_text())["step"])

    def check(self, cfg: RecipeConfig) -> None:
        """Raises RunError when starting here would lose or overwrite earlier results."""
        done = self.finished_step()
        if done is not None and cfg.training.if_output_exists == "refuse":
            raise RunError(
                f"training.output_dir {str(self.root)!r} already holds a finished run (step "
                f"{done}); choose a new output_dir, or set training.if_output_exists=resume to "
                "continue it"
            )
        has_ckpt = (self.checkpoints / "latest").is_file()
        if has_ckpt and (cfg.checkpoint.resume == "never" or not cfg.checkpoint.enabled):
            raise RunError(
                f"training.output_dir {str(self.root)!r} holds checkpoints that this run would "
                "overwrite; set checkpoint.resume=auto to continue, or choose a new output_dir"
            )

    def prepare(self, cfg: RecipeConfig) -> None:
        """Creates the folder and records the resolved config (first run only)."""
        self.root.mkdir(parents=True, exist_ok=True)
        path = self.root / "config.yaml"
        if not path.exists():
            path.write_text(
                yaml.safe_dump(cfg.model_dump(mode="json", by_alias=True), sort_keys=False)
            )

    def mark_finished(self, step: int, output: Path, **info: Any) -> None:
        """Writes the FINISHED marker naming the final step and output folder."""
        self.finished_marker.write_text(json.dumps({"step": step, "output": str(output), **info}))
