"""Helpers for tests that run the `automodel` CLI (subprocess or in-process) on the bundled tiny model."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

DRIVER = Path(__file__).with_name("_drive_cli.py")
"""Runs several CLI invocations in one subprocess: one interpreter and torch import for all."""

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


def split_runs(stdout: str) -> list[tuple[int, str]]:
    """Returns (exit code, output) per run from the output of ``_drive_cli.py``."""
    out = []
    for part in re.split(r"== run \d+ ==\n", stdout)[1:]:
        body, code = part.rsplit("== exit ", 1)
        out.append((int(code.split()[0]), body))
    return out


def losses(output_dir: Path) -> dict[int, float]:
    """Returns step -> training loss from a run's metrics.jsonl (the last record of each step)."""
    out: dict[int, float] = {}
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


@dataclass
class InProcessRun:
    """The result of :func:`automodel_in_process`: exit code and the captured stdout/stderr."""

    exit_code: int
    stdout: str
    stderr: str


def automodel_in_process(*args: str) -> InProcessRun:
    """Runs ``automodel ARGS`` through the real click entry point in this process, on 1 CPU thread.

    For runs that need no process of their own (references, policies, resume): the recipe, the
    models, the data, the checkpoints are the same as in a subprocess, minus the interpreter and
    torch start-up. One intra-op thread, like ``cli_env``, keeps the floating-point reductions
    bit-identical with subprocess runs.
    """
    import torch
    from click.testing import CliRunner

    from automodel.recipes.cli import main

    if args and args[0] in ("run", "finetune", "pretrain", "distill", "benchmark"):
        args = (*args, "training.device=cpu")  # as CUDA_VISIBLE_DEVICES="" does for subprocesses
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        res = CliRunner().invoke(
            main, [*args], env={"OMP_NUM_THREADS": "1"}, catch_exceptions=False
        )
    finally:
        torch.set_num_threads(threads)
    return InProcessRun(res.exit_code, res.stdout, res.stderr)
