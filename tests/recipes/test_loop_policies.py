"""LR schedules, and the non-finite loss policy (skip / stop) through the CLI with a `_target_` loss."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
from recipes._runs import QUICK, cli_env

from automodel.recipes._bundled import default_config
from automodel.recipes.config import LRSchedulerSection
from automodel.recipes.train import lr_multiplier


def test_lr_schedules():
    cos = LRSchedulerSection(kind="cosine", warmup_steps=4, min_lr_ratio=0.1)
    assert [lr_multiplier(s, 20, cos) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert lr_multiplier(4, 20, cos) == 1.0 and lr_multiplier(19, 20, cos) == pytest.approx(0.1)
    assert lr_multiplier(0, 20, LRSchedulerSection(kind="constant")) == 1.0
    lin = LRSchedulerSection(kind="linear", min_lr_ratio=0.0)
    assert lr_multiplier(5, 11, lin) == pytest.approx(0.5)
    wsd = LRSchedulerSection(kind="wsd", warmup_steps=2, decay_fraction=0.25, min_lr_ratio=0.0)
    values = [lr_multiplier(s, 20, wsd) for s in range(20)]
    assert values[2:15] == [1.0] * 13  # stable until the last 25% of steps
    assert values[15] == 1.0 and values[19] == pytest.approx(0.0)
    assert all(a >= b for a, b in itertools.pairwise(values[15:]))


@pytest.mark.slow
def test_nonfinite_loss_skips_or_stops(tmp_path: Path):
    driver = Path(__file__).with_name("_drive_cli.py")
    common = [*QUICK, "training.max_steps=4", "training.loss._target_=_nan_loss.nan_on_third_call"]
    runs = [
        ["run", str(default_config("finetune")), *common, "training.on_nonfinite=skip", f"training.output_dir={tmp_path / 'skip'}"],
        ["run", str(default_config("finetune")), *common, "training.on_nonfinite=stop", f"training.output_dir={tmp_path / 'stop'}"],
    ]  # fmt: skip
    outs = []
    for run in runs:  # one process each: the NaN counter is per process
        proc = subprocess.run(
            [sys.executable, str(driver), json.dumps([run])], cwd=tmp_path, text=True, capture_output=True,
            env=cli_env(PYTHONPATH=str(Path(__file__).parent)), timeout=400,
        )  # fmt: skip
        outs.append(proc)
    skip, stop = outs
    assert "== exit 0 ==" in skip.stdout, skip.stdout + skip.stderr
    assert "step 3: non-finite loss or gradient, optimizer step skipped" in skip.stdout
    assert (tmp_path / "skip" / "FINISHED").is_file()
    assert "== exit 1 ==" in stop.stdout, stop.stdout + stop.stderr
    err = [line for line in stop.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and "non-finite loss or gradient at step 3" in err[0]
    assert "training.on_nonfinite=skip" in err[0]
    assert not (tmp_path / "stop" / "FINISHED").exists()
