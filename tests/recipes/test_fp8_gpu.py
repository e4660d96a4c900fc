"""The `fp8` section on a GPU: the benchmark recipe trains with torchao FP8 linears (`pytest -m gpu`)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from recipes._runs import DRIVER, split_runs


@pytest.mark.gpu
@pytest.mark.slow
def test_fp8_benchmark_converts_the_linears_and_matches_bf16(tmp_path: Path) -> None:
    pytest.importorskip("torchao", reason="fp8 needs the automodel-kernels[fp8] extra (torchao)")
    if torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("FP8 matmuls need compute capability 8.9+ (H100/H200)")
    common = ["benchmark", "training.max_steps=4", "benchmark.window=2", "benchmark.warmup_steps=1",
              "benchmark.seq_len=128", "fp8.min_features=64", "--nproc-per-node", "1"]  # fmt: skip
    runs = [common, [*common, "fp8.enabled=true"]]
    proc = subprocess.run(
        [sys.executable, str(DRIVER), json.dumps(runs)], cwd=tmp_path, env={**os.environ},
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (bf16_code, bf16), (fp8_code, fp8) = split_runs(proc.stdout)
    assert bf16_code == 0 and fp8_code == 0, proc.stdout + proc.stderr
    assert "fp8:" not in bf16
    # 4 layers x 7 projections; lm_head stays in bf16 (fp8.filter_fqns).
    assert "fp8: 28 of 29 linear layers use FP8 matmuls (tensorwise scaling)" in fp8, fp8
    first = [float(re.search(r"steps 1-2: loss=([0-9.]+)", out).group(1)) for out in (bf16, fp8)]
    assert abs(first[0] - first[1]) < 0.05 * first[0], first  # same random tokens, same init
