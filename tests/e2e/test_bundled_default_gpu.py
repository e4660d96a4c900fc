"""On a GPU machine the README's main command trains on the GPU (run with `pytest -m gpu`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.gpu
@pytest.mark.slow
def test_finetune_bundled_default_uses_the_gpu(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "automodel.recipes.cli", "finetune", "training.max_steps=60",
         "training.log_every=20", f"training.output_dir={tmp_path / 'run'}", "--nproc-per-node", "1"],
        cwd=tmp_path, env={**os.environ}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "on cuda:0 x1" in proc.stdout
    losses = [float(x) for x in re.findall(r"loss=([0-9.]+)", proc.stdout)]
    assert losses[-1] < losses[0]
    assert Path(proc.stdout.strip().splitlines()[-1]).name == "model"
