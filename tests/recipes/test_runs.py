"""The training loop through the real CLI: DP/grad-accum equivalence, SLURM launch, SIGTERM + exact resume."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from recipes._runs import (
    DRIVER,
    QUICK,
    automodel_in_process,
    cli_env,
    losses,
    split_runs,
)

from automodel.recipes._bundled import default_config
from automodel.recipes.cli import main
from harness.distributed import free_port

CONFIG = str(default_config("finetune"))


@pytest.mark.slow
def test_global_token_loss_is_the_same_for_accumulation_dp_and_two_slurm_nodes(tmp_path: Path):
    """micro 4 x 1 == micro 2 x accum 2 == 2 ranks x micro 2, on one node and on 2 SLURM "nodes"."""
    steps = ["training.max_steps=3"]
    runs = {
        "single": [*QUICK, *steps],
        "accum": [*QUICK, *steps, "training.micro_batch_size=2", "training.grad_accum_steps=2"],
        "dp2": [*QUICK, *steps, "training.micro_batch_size=2"],
    }
    # One process: in this process. Two processes: the SLURM script's launch line, below.
    for name in ("single", "accum"):
        res = automodel_in_process(
            "run", CONFIG, *runs[name], f"training.output_dir={tmp_path / name}"
        )
        assert res.exit_code == 0, res.stdout + res.stderr

    # Two processes on one node (`--nproc-per-node 2`, torchrun's standalone rendezvous), side by
    # side with the 2-"node" SLURM run below.
    standalone = subprocess.Popen(
        [sys.executable, "-m", "automodel.recipes.cli", "run", CONFIG, *runs["dp2"],
         f"training.output_dir={tmp_path / 'dp2'}", "--nproc-per-node", "2"],
        cwd=tmp_path, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip

    # SLURM: the dry-run script is valid bash; its per-node line (`automodel run` with the
    # multi-node options, which execs torchrun) runs 2 nodes on localhost.
    port = free_port()
    res = CliRunner().invoke(
        main, ["slurm", CONFIG, *runs["dp2"], f"training.output_dir={tmp_path / 'slurm'}",
               "--nodes", "2", "--gpus-per-node", "1", "--partition", "p", "--time", "01:00:00",
               "--port", str(port), "--dry-run"],
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
    launch = inner.group(1)
    assert launch.startswith("python -m automodel.recipes.cli run ")
    for arg in ("--nnodes=2", "--nproc-per-node=1", '--node-rank="$SLURM_NODEID"',
                f'--rdzv-endpoint="$HEAD_NODE:{port}"'):  # fmt: skip
        assert arg in launch
    # The whole script runs, with stand-ins for SLURM's tools: `scontrol` names this host as the
    # allocation's first node, `srun` starts its command once per "node" with SLURM_NODEID set.
    fake_bin = tmp_path / "fake_slurm_bin"
    fake_bin.mkdir()
    (fake_bin / "scontrol").write_text("#!/bin/bash\necho 127.0.0.1\n")
    (fake_bin / "srun").write_text(
        "#!/bin/bash\nwhile [[ $1 == --* ]]; do shift; done\npids=()\n"
        'for i in 0 1; do SLURM_NODEID=$i "$@" & pids+=($!); done\n'
        'rc=0; for p in "${pids[@]}"; do wait "$p" || rc=1; done; exit $rc\n'
    )
    (fake_bin / "python").write_text(f'#!/bin/bash\nexec {sys.executable} "$@"\n')
    for tool in ("scontrol", "srun", "python"):
        (fake_bin / tool).chmod(0o755)
    path = f"{fake_bin}{os.pathsep}{os.environ['PATH']}"
    env = cli_env(PATH=path, SLURM_JOB_NODELIST="node[1-2]", SLURM_JOB_ID="42")
    env.pop("HEAD_NODE", None)
    proc = subprocess.run(
        ["bash", "-s"], input=script, cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=400,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    # Rank 0 reports 2 processes (one per node) and prints the final folder last.
    assert "on cpu x2" in out, out
    assert str((tmp_path / "slurm" / "model").resolve()) in out.splitlines(), out

    standalone_out = standalone.communicate(timeout=400)[0]
    assert standalone.returncode == 0, standalone_out
    assert "on cpu x2" in standalone_out, standalone_out

    ref = losses(tmp_path / "single")
    assert sorted(ref) == [1, 2, 3]
    for name in ("accum", "dp2", "slurm"):
        got = losses(tmp_path / name)
        assert got.keys() == ref.keys()
        for step in ref:
            assert got[step] == pytest.approx(ref[step], rel=1e-5), (name, step, got, ref)


@pytest.mark.slow
def test_sigterm_checkpoints_and_resume_reproduces_the_uninterrupted_losses(tmp_path: Path):
    """SIGTERM mid-run -> checkpoint and clean exit; the resumed run's losses are bit-identical.

    One subprocess is signalled twice: an SFT run (map-style data) and a streaming pretraining
    run (the stream position and the partly packed row come back from the checkpoint). The
    uninterrupted references and the resumed runs go through the same CLI in this process.
    """
    runs = {
        "sft": ["run", CONFIG, *QUICK, "training.max_steps=8", "optimizer.lr=0.003"],
        "stream": ["pretrain", *QUICK, "training.max_steps=8", "data.streaming=true",
                   "data.max_length=48", "training.micro_batch_size=2", "data.train.limit=40"],
    }  # fmt: skip
    killed = [
        [*args, f"training.output_dir={tmp_path / name / 'killed'}"] for name, args in runs.items()
    ]
    proc = subprocess.Popen(
        [sys.executable, str(DRIVER), json.dumps(killed)], cwd=tmp_path, env=cli_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    seen: list[str] = []
    for line in proc.stdout:
        seen.append(line)
        if line.startswith("step 2/8"):
            os.kill(proc.pid, signal.SIGTERM)
    assert proc.wait(timeout=300) == 0, "".join(seen)
    bodies = split_runs("".join(seen))
    assert [code for code, _ in bodies] == [0, 0], "".join(seen)

    for (name, args), (_, text) in zip(runs.items(), bodies):
        out = tmp_path / name / "killed"
        m = re.search(r"received SIGTERM: checkpoint saved at step (\d+); exiting", text)
        assert m is not None, text
        stopped = int(m.group(1))
        assert 2 <= stopped < 8
        assert (out / "checkpoints" / f"step_{stopped}" / "model.safetensors").is_file()
        assert text.strip().splitlines()[-1] == str(
            (out / "checkpoints" / f"step_{stopped}").resolve()
        )
        assert not (out / "FINISHED").exists() and not (out / "model").exists()

        full = automodel_in_process(*args, f"training.output_dir={tmp_path / name / 'full'}")
        assert full.exit_code == 0, full.stdout + full.stderr
        resumed = automodel_in_process(*args, f"training.output_dir={out}")
        assert resumed.exit_code == 0, resumed.stdout + resumed.stderr
        assert f"at step {stopped}" in resumed.stdout
        ref, got = losses(tmp_path / name / "full"), losses(out)
        assert sorted(got) == list(range(1, 9))
        # Bit-identical: model, optimizer, schedule, data position and RNG restored.
        assert got == ref, (name, got, ref)
