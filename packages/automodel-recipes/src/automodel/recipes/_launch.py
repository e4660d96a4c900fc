"""Launching: run in place, or re-exec under torch's elastic launcher (torchrun) for N processes."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence


def under_torchrun() -> bool:
    """Returns True when this process was started by torchrun (or an equivalent launcher)."""
    return "TORCHELASTIC_RUN_ID" in os.environ or (
        "LOCAL_RANK" in os.environ and "WORLD_SIZE" in os.environ
    )


def default_nproc() -> int:
    """Returns the number of visible GPUs, or 1 on a CPU-only machine."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 1


def torchrun_args(
    nproc_per_node: int,
    nnodes: int = 1,
    node_rank: int = 0,
    rdzv_endpoint: str | None = None,
    rdzv_id: str | None = None,
) -> list[str]:
    """Returns torchrun's launcher arguments (without the program) for a local or multi-node run.

    One node uses ``--standalone`` (a private rendezvous on a free port); several nodes meet at
    ``rdzv_endpoint`` (host:port of the first node) through the c10d rendezvous, under the id
    ``rdzv_id`` (default: $AUTOMODEL_RUN_ID, which the SLURM script sets to the job id).

    Raises:
        ValueError: several nodes but no rendezvous endpoint.
    """
    args = [f"--nproc-per-node={nproc_per_node}"]
    if nnodes == 1 and rdzv_endpoint is None:
        return [*args, "--standalone"]
    if rdzv_endpoint is None:
        raise ValueError(
            f"--nnodes={nnodes} needs --rdzv-endpoint HOST:PORT (the first node's address)"
        )
    return [
        *args,
        f"--nnodes={nnodes}",
        f"--node-rank={node_rank}",
        "--rdzv-backend=c10d",
        f"--rdzv-endpoint={rdzv_endpoint}",
        f"--rdzv-id={rdzv_id or os.environ.get('AUTOMODEL_RUN_ID') or 'automodel'}",
    ]


def relaunch(launcher_args: Sequence[str], cli_args: Sequence[str]) -> None:
    """Replaces this process with ``torchrun <launcher_args> automodel <cli_args>``; never returns.

    Replacing (exec) rather than spawning means SIGTERM/SIGUSR1 sent to ``automodel`` reach
    torchrun, which forwards them to the training processes (they checkpoint and exit). Every
    rank shares one AUTOMODEL_RUN_ID so `${AUTOMODEL_RUN_ID}` resolves identically.
    """
    env = {**os.environ}
    env.setdefault("AUTOMODEL_RUN_ID", time.strftime("%Y%m%d-%H%M%S"))
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher_args,
           "-m", "automodel.recipes.cli", *cli_args]  # fmt: skip
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, cmd, env)
