"""Helpers for tests that run the `automodel` CLI in real subprocesses on the bundled tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

# A few steps on the bundled 0.7M-parameter Llama and 32 chats: seconds per run.
QUICK = [
    "training.log_every=1",
    "training.micro_batch_size=4",
    "training.sample_prompt=null",
    "training.progress_bar=false",
    "data.validation=null",
    "data.train.limit=32",
    "lr_scheduler.warmup_steps=1",
    "checkpoint.every_steps=null",
]


def cli_env(**extra: str) -> dict[str, str]:
    """Returns the environment for a CLI subprocess: CPU only, one thread per process."""
    return {**os.environ, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1", **extra}


def automodel(*args: str, cwd: Path, timeout: float = 400) -> subprocess.CompletedProcess[str]:
    """Runs ``automodel ARGS`` to completion; returns the finished process (stdout/stderr text)."""
    return subprocess.run(
        [sys.executable, "-m", "automodel.recipes.cli", *args],
        cwd=cwd,
        env=cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def losses(output_dir: Path) -> dict[int, float]:
    """Returns step -> training loss from a run's metrics.jsonl (the last record of each step)."""
    out: dict[int, float] = {}
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out
