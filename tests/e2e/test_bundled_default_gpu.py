"""On a GPU machine the README's main command trains on the GPUs, in bf16 (run with `pytest -m gpu`)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.gpu
@pytest.mark.slow
def test_finetune_bundled_default_uses_the_gpu(tmp_path: Path) -> None:
    # No --nproc-per-node: the default is one process per visible GPU.
    proc = subprocess.run(
        [sys.executable, "-m", "automodel.recipes.cli", "finetune", "training.max_steps=60",
         "training.log_every=20", f"training.output_dir={tmp_path / 'run'}"],
        cwd=tmp_path, env={**os.environ}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    gpus = torch.cuda.device_count()
    model_line = next(line for line in proc.stdout.splitlines() if line.startswith("model "))
    # Rank 0 logs: its device, the number of processes (= visible GPUs) and the parameter dtype.
    assert model_line.endswith(f"bfloat16 on cuda:0 x{gpus}"), model_line
    losses = [float(x) for x in re.findall(r"step \d+/60 loss=([0-9.]+)", proc.stdout)]
    assert len(losses) == 3 and losses[-1] < losses[0], proc.stdout
    assert "mem=" in proc.stdout  # peak GPU memory is reported on CUDA log steps
    final = Path(proc.stdout.strip().splitlines()[-1])
    assert final == (tmp_path / "run" / "model").resolve()
    assert '"dtype": "bfloat16"' in (final / "config.json").read_text()
