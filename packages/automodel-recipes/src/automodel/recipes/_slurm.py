"""SLURM: an sbatch script running one torchrun per node (through `automodel run`), rendezvous on node 0."""

from __future__ import annotations

import shlex
from collections.abc import Sequence


def sbatch_script(
    config: str,
    overrides: Sequence[str],
    *,
    nodes: int,
    gpus_per_node: int,
    partition: str | None = None,
    time: str | None = None,
    container: str | None = None,
    job_name: str = "automodel",
    port: int = 29500,
    python: str = "python",
) -> str:
    """Returns an sbatch script for ``automodel run CONFIG`` on ``nodes`` x ``gpus_per_node``.

    ``srun`` starts one ``automodel run --nnodes N --node-rank R --rdzv-endpoint HEAD:PORT`` per
    node, which becomes torchrun (exec); they meet at a c10d rendezvous on the first node of the
    allocation, with the job id as rendezvous id. SLURM sends SIGUSR1 two minutes before the time limit (``--signal``); the
    script forwards it (and SIGTERM) to srun, which delivers it to every task, and torchrun
    passes it to the training processes, which checkpoint and exit cleanly.

    Example:
        >>> print(sbatch_script("sft.yaml", [], nodes=2, gpus_per_node=8))
    """
    directives = [
        f"#SBATCH --job-name={job_name}",
        f"#SBATCH --nodes={nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={gpus_per_node}",
        "#SBATCH --signal=B:USR1@120",
        "#SBATCH --output=%x-%j.out",
    ]
    if partition:
        directives.append(f"#SBATCH --partition={partition}")
    if time:
        directives.append(f"#SBATCH --time={time}")
    # Each node runs `automodel run` with the multi-node launch options; the CLI validates the
    # config and replaces itself (exec) with torchrun, the same launcher as on a workstation.
    program = " ".join(
        shlex.quote(a)
        for a in ["-m", "automodel.recipes.cli", "run", config, *overrides,
                  f"--nnodes={nodes}", f"--nproc-per-node={gpus_per_node}"]
    )  # fmt: skip
    torchrun = f'{python} {program} --node-rank="$SLURM_NODEID" --rdzv-endpoint="$HEAD_NODE:{port}"'
    container_args = f"--container-image={shlex.quote(container)} " if container else ""
    lines = [
        "#!/bin/bash",
        *directives,
        "set -euo pipefail",
        "",
        "# The rendezvous host: the first node of the allocation.",
        'export HEAD_NODE=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        'export AUTOMODEL_RUN_ID="${AUTOMODEL_RUN_ID:-$SLURM_JOB_ID}"',
        "",
        "# One launcher (automodel -> torchrun) per node; --kill-on-bad-exit stops all if one fails.",
        f"srun --kill-on-bad-exit=1 {container_args}bash -c {shlex.quote(torchrun)} &",
        "SRUN_PID=$!",
        "",
        "# Forward preemption to the tasks: they checkpoint and exit cleanly.",
        'forward() { kill -s "$1" "$SRUN_PID" 2>/dev/null || true; }',
        "trap 'forward USR1' USR1",
        "trap 'forward TERM' TERM",
        "# wait returns early when a trapped signal arrives: keep waiting for srun.",
        'while kill -0 "$SRUN_PID" 2>/dev/null; do wait "$SRUN_PID" || true; done',
        'wait "$SRUN_PID"',
        "",
    ]
    return "\n".join(lines)
