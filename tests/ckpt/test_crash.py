"""Crash injection: SIGKILL a process in the middle of CheckpointManager.save, at chosen points and at
random moments; ``latest()`` must always name a complete checkpoint that loads."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from ckpt._crash_child import build

from automodel.ckpt import CheckpointManager, verify

pytestmark = pytest.mark.slow

CHILD = str(Path(__file__).with_name("_crash_child.py"))

# (os function, argument substring, nth matching call) -> the step latest() must return after.
KILL_POINTS = {
    "writing model bytes": (("pwrite", "*", 3), 1),
    "after a model file fsync": (("fsync", "*", 2), 1),
    "writing optimizer (DCP metadata)": (("rename", ".metadata", 1), 1),
    "writing trainer state": (("replace", "rank_00000.pt", 1), 1),
    "writing the completion marker": (("replace", "checkpoint.json", 1), 1),
    "publishing rename": (("rename", ".partial.step_2", 2), 1),  # 1st: DCP .metadata
    "after rename, before latest pointer": (("replace", "latest", 1), 1),
    "during retention of step 1": (("rename", ".trash.step_1", 1), 2),
}


def _check_loadable(root: Path, expected: int | None = None) -> int:
    manager = CheckpointManager(root)
    step = manager.latest()
    assert step is not None and (expected is None or step == expected)
    model, optimizer = build()
    extra = {"note": ""}
    assert manager.load("latest", model=model, optimizer=optimizer, extra=extra) == step
    assert extra["note"] == f"step {step}"
    assert torch.all(model[0].bias == float(step))
    assert verify(manager.path(step)).ok
    assert not list(root.glob(".partial.*"))  # the new manager cleaned up
    return step


def _armed(root: Path, point: tuple[str, str, int]) -> subprocess.CompletedProcess[str]:
    args = [sys.executable, CHILD, str(root), "armed", *map(str, point)]
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


def test_sigkill_at_each_point_of_save(tmp_path):
    roots = {name: tmp_path / f"run{i}" for i, name in enumerate(KILL_POINTS)}
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(
            zip(
                KILL_POINTS,
                pool.map(lambda n: _armed(roots[n], KILL_POINTS[n][0]), KILL_POINTS),
            )
        )
    for name, result in results.items():
        assert result.returncode == -signal.SIGKILL, (name, result.stdout, result.stderr[-2000:])
        _check_loadable(roots[name], expected=KILL_POINTS[name][1])


def test_sigkill_at_random_moments(tmp_path):
    rng = random.Random(0)
    seen = set()
    for attempt in range(3):
        root = tmp_path / f"loop{attempt}"
        proc = subprocess.Popen(
            [sys.executable, CHILD, str(root), "loop"], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "saved 1"
        time.sleep(rng.uniform(0.0, 0.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        seen.add(_check_loadable(root))
    assert seen
