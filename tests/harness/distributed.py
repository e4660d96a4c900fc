"""Run a function on N CPU ranks (gloo) from a pytest test, and get each rank's return value back.

    def _worker(rank: int, world_size: int, scale: float) -> float:
        t = torch.ones(1) * rank * scale
        dist.all_reduce(t)
        return float(t)

    def test_allreduce():
        assert run_distributed(_worker, world_size=2, scale=2.0) == [2.0, 2.0]

The worker must be a module-level function of an importable file (a test module is fine). Each rank
is a fresh ``python`` process with the torchrun environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT...). By default the gloo process group is initialized before the worker runs
and destroyed after. Return values travel back through ``torch.save`` (tensors, dicts, lists...).
If any rank fails or the run exceeds ``timeout``, every rank is killed and the test fails with every
rank's log, so a hang or crash is never silent.
"""

from __future__ import annotations

import inspect
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

_TESTS_DIR = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """Returns a TCP port on localhost that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_distributed(
    fn: Callable[..., Any],
    world_size: int = 2,
    *,
    timeout: float = 240.0,
    init_process_group: bool = True,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Runs ``fn(rank, world_size, **kwargs)`` on ``world_size`` gloo ranks; returns results by rank."""
    source = Path(inspect.getfile(fn)).resolve()
    with tempfile.TemporaryDirectory(prefix="automodel-dist-") as tmp_str:
        tmp = Path(tmp_str)
        torch.save(kwargs, tmp / "kwargs.pt")
        port = free_port()
        procs: list[subprocess.Popen[bytes]] = []
        logs = []
        for rank in range(world_size):
            rank_env = {
                **os.environ,
                "RANK": str(rank),
                "LOCAL_RANK": str(rank),
                "WORLD_SIZE": str(world_size),
                "LOCAL_WORLD_SIZE": str(world_size),
                "GROUP_RANK": "0",
                "MASTER_ADDR": "127.0.0.1",
                "MASTER_PORT": str(port),
                "OMP_NUM_THREADS": "1",
                "PYTHONFAULTHANDLER": "1",  # a segfaulting rank prints its Python stack
                "CUDA_VISIBLE_DEVICES": "",
                "PYTHONPATH": os.pathsep.join([str(_TESTS_DIR), os.environ.get("PYTHONPATH", "")]),
                **(env or {}),
            }
            log = open(tmp / f"rank{rank}.log", "wb")  # noqa: SIM115 - closed below
            logs.append(log)
            procs.append(
                subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "harness._rank_main",
                        str(source),
                        fn.__qualname__,
                        str(tmp),
                        "1" if init_process_group else "0",
                    ],
                    env=rank_env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
        failure = _wait_all(procs, timeout)
        for log in logs:
            log.close()
        if failure:
            report = [f"run_distributed({fn.__qualname__}, world_size={world_size}) {failure}"]
            for rank in range(world_size):
                text = (tmp / f"rank{rank}.log").read_text(errors="replace")
                done = "result written" if (tmp / f"result{rank}.pt").exists() else "no result"
                report.append(
                    f"----- rank {rank} (exit {procs[rank].returncode}, {done}) -----\n"
                    f"{text[-6000:]}"
                )
            raise AssertionError("\n".join(report))
        return [
            torch.load(tmp / f"result{rank}.pt", weights_only=False) for rank in range(world_size)
        ]


def _wait_all(procs: list[subprocess.Popen[bytes]], timeout: float) -> str | None:
    """Waits for every rank; kills all on the first failure or the deadline; returns why, or None."""
    deadline = time.monotonic() + timeout
    while True:
        codes = [p.poll() for p in procs]
        if any(c not in (None, 0) for c in codes):
            _kill_all(procs)
            bad = [i for i, c in enumerate(codes) if c not in (None, 0)]
            return f"failed: rank(s) {bad} exited non-zero"
        if all(c == 0 for c in codes):
            return None
        if time.monotonic() > deadline:
            _kill_all(procs)
            waiting = [i for i, c in enumerate(codes) if c is None]
            return f"timed out after {timeout:.0f}s: rank(s) {waiting} still running (hang?)"
        time.sleep(0.05)


def _kill_all(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        if p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    for p in procs:
        p.wait()
