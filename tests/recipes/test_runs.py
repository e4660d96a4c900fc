"""The training loop through the real CLI: DP/grad-accum equivalence, SLURM launch, SIGTERM + exact resume."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from recipes._runs import QUICK, automodel, cli_env, losses

from automodel.recipes._bundled import default_config
from automodel.recipes.cli import main
from harness.distributed import free_port

CONFIG = str(default_config("finetune"))


@pytest.mark.slow
def test_global_token_loss_is_the_same_for_accumulation_dp_and_two_slurm_nodes(tmp_path: Path):
    """micro 4 x 1 == micro 2 x accum 2 == 2 ranks x micro 2 == 2 SLURM "nodes" x micro 2."""
    steps = ["training.max_steps=3"]
    runs = {
        "single": [*QUICK, *steps],
        "accum": [*QUICK, *steps, "training.micro_batch_size=2", "training.grad_accum_steps=2"],
        "dp2": [*QUICK, *steps, "training.micro_batch_size=2"],
    }
    procs = {}
    for name, args in runs.items():
        extra = ["--nproc-per-node", "2"] if name == "dp2" else []
        procs[name] = automodel(
            "run", CONFIG, *args, f"training.output_dir={tmp_path / name}", *extra, cwd=tmp_path
        )
        assert procs[name].returncode == 0, procs[name].stdout + procs[name].stderr
    assert procs["dp2"].stdout.strip().splitlines()[-1] == str(
        (tmp_path / "dp2" / "model").resolve()
    )

    # SLURM: the dry-run script is valid bash, and its torchrun command runs 2 nodes on localhost.
    port = free_port()
    slurm_args = [
        *QUICK,
        *steps,
        "training.micro_batch_size=2",
        f"training.output_dir={tmp_path / 'slurm'}",
    ]
    res = CliRunner().invoke(
        main, ["slurm", CONFIG, *slurm_args, "--nodes", "2", "--gpus-per-node", "1", "--partition", "p",
               "--time", "01:00:00", "--port", str(port), "--dry-run"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    script = res.output
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    for directive in (
        "--nodes=2",
        "--gpus-per-node=1",
        "--partition=p",
        "--time=01:00:00",
        "--signal=B:USR1@120",
    ):
        assert f"#SBATCH {directive}" in script
    inner = re.search(r"bash -c '(.*)' &", script)
    assert inner is not None, script
    torchrun = inner.group(1)
    for arg in ("--nnodes=2", "--nproc-per-node=1", '--node-rank="$SLURM_NODEID"', "--rdzv-backend=c10d",
                f'--rdzv-endpoint="$HEAD_NODE:{port}"'):  # fmt: skip
        assert arg in torchrun
    nodes = [
        subprocess.Popen(
            ["bash", "-c", torchrun.replace("python -m", f"{sys.executable} -m", 1)],
            cwd=tmp_path,
            env=cli_env(HEAD_NODE="127.0.0.1", SLURM_NODEID=str(i), SLURM_JOB_ID="42"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=400)[0] for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], "\n".join(outs)

    ref = losses(tmp_path / "single")
    assert sorted(ref) == [1, 2, 3]
    for name in ("accum", "dp2", "slurm"):
        got = losses(tmp_path / name)
        assert got.keys() == ref.keys()
        for step in ref:
            assert got[step] == pytest.approx(ref[step], rel=1e-5), (name, step, got, ref)


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_reproduces_the_uninterrupted_losses(tmp_path: Path):
    args = [*QUICK, "training.max_steps=8", "optimizer.lr=0.003"]
    full = automodel("run", CONFIG, *args, f"training.output_dir={tmp_path / 'full'}", cwd=tmp_path)
    assert full.returncode == 0, full.stdout + full.stderr

    out = tmp_path / "killed"
    cmd = [
        sys.executable,
        "-m",
        "automodel.recipes.cli",
        "run",
        CONFIG,
        *args,
        f"training.output_dir={out}",
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=cli_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step 2/8"):
            os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, "".join(seen)
    text = "".join(seen)
    m = re.search(r"received SIGTERM: checkpoint saved at step (\d+); exiting", text)
    assert m is not None, text
    stopped = int(m.group(1))
    assert 2 <= stopped < 8
    assert (out / "checkpoints" / f"step_{stopped}" / "model.safetensors").is_file()
    assert seen[-1].strip() == str((out / "checkpoints" / f"step_{stopped}").resolve())
    assert not (out / "FINISHED").exists() and not (out / "model").exists()

    resumed = automodel("run", CONFIG, *args, f"training.output_dir={out}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"at step {stopped}" in resumed.stdout
    ref, got = losses(tmp_path / "full"), losses(out)
    assert sorted(got) == list(range(1, 9))
    assert got == ref  # bit-identical: model, optimizer, schedule, data position and RNG restored
