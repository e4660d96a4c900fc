"""LR schedules, and the non-finite loss policy (skip / stop) through the CLI with a `_target_` loss."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
from recipes._runs import QUICK, automodel_in_process

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


def test_nonfinite_loss_skips_or_stops(tmp_path: Path):
    """Through the real CLI in this process (no subprocess needed): skip goes on, stop errors out."""
    from recipes import _nan_loss

    common = [*QUICK, "training.max_steps=4",
              "training.loss._target_=recipes._nan_loss.nan_on_third_call"]  # fmt: skip
    outs = {}
    for policy in ("skip", "stop"):
        _nan_loss.reset()
        outs[policy] = automodel_in_process(
            "run", str(default_config("finetune")), *common, f"training.on_nonfinite={policy}",
            f"training.output_dir={tmp_path / policy}",
        )  # fmt: skip
    skip, stop = outs["skip"], outs["stop"]
    assert skip.exit_code == 0, skip.stdout + skip.stderr
    assert "step 3: non-finite loss or gradient, optimizer step skipped" in skip.stdout
    assert "step 4/4 loss=" in skip.stdout and (tmp_path / "skip" / "FINISHED").is_file()
    assert stop.exit_code == 1, stop.stdout + stop.stderr
    err = [line for line in stop.stderr.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and err[0].startswith("error: non-finite loss or gradient at step 3")
    assert "training.on_nonfinite=skip" in err[0]
    assert not (tmp_path / "stop" / "FINISHED").exists()
