"""The ``automodel-ckpt`` CLI through real subprocesses: success paths, exit codes, --json, and the
bad-input matrix (one line on stderr, no traceback, non-zero exit)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from ckpt._damage import corrupt_copies

from automodel.ckpt import save

pytestmark = pytest.mark.slow

EXE = shutil.which("automodel-ckpt") or str(Path(sys.executable).parent / "automodel-ckpt")


def _run_all(commands: list[list[str]]) -> list[subprocess.CompletedProcess[str]]:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with ThreadPoolExecutor(max_workers=4) as pool:
        return list(
            pool.map(
                lambda args: subprocess.run(
                    [EXE, *args], capture_output=True, text=True, timeout=900, env=env
                ),
                commands,
            )
        )


def _sparse_huge_checkpoint(folder: Path) -> Path:
    """A valid 1 TiB safetensors file that occupies almost no disk (sparse): merging it must be
    refused for lack of space before anything is written."""
    folder.mkdir()
    size = 2**40
    header = json.dumps({"big": {"dtype": "U8", "shape": [size], "data_offsets": [0, size]}})
    header += " " * (-len(header) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header.encode())
        f.truncate(8 + len(header) + size)
    return folder


def test_cli_success_paths_and_exit_codes(tmp_path, tiny_model_dir):
    src = str(tiny_model_dir("llama", max_shard_size="30KB"))
    other = save({"w": torch.ones(2)}, tmp_path / "other")
    first = _run_all(
        [
            ["--help"],
            ["merge", "--help"],
            ["inspect", src, "--json"],
            ["verify", src],
            ["merge", src, str(tmp_path / "merged"), "--json"],
            ["convert", src, str(tmp_path / "dcp"), "--to", "dcp", "--dtype", "bf16"],
            ["diff", src, str(other)],
        ]
    )
    for result in first:
        assert "Traceback" not in result.stderr, result.stderr
    help_, merge_help, inspect_, verify_, merge_, convert_, diff_other = first
    assert help_.returncode == 0 and all(
        c in help_.stdout for c in ("inspect", "verify", "merge", "reshard", "convert", "diff")
    )
    assert merge_help.returncode == 0 and "--overwrite" in merge_help.stdout
    assert "--dtype" in merge_help.stdout and "--max-shard-size" in merge_help.stdout
    info = json.loads(inspect_.stdout)
    assert (
        inspect_.returncode == 0 and info["format"] == "safetensors" and info["num_parameters"] > 0
    )
    assert verify_.returncode == 0 and "OK" in verify_.stdout
    assert merge_.returncode == 0 and json.loads(merge_.stdout)["files"]
    assert convert_.returncode == 0, convert_.stderr
    assert diff_other.returncode == 1 and "only in A" in diff_other.stdout

    merged, dcp = str(tmp_path / "merged"), str(tmp_path / "dcp")
    second = _run_all(
        [
            ["reshard", merged, str(tmp_path / "r"), "--max-shard-size", "20KB", "--json"],
            ["diff", src, merged, "--json"],
            ["diff", src, dcp],
            ["diff", src, dcp, "--atol", "1e-2", "--rtol", "1e-2"],
            ["verify", dcp, "--json"],
        ]
    )
    reshard_, diff_same, diff_bf16, diff_tol, verify_dcp = second
    assert reshard_.returncode == 0, reshard_.stderr
    assert len([f for f in json.loads(reshard_.stdout)["files"] if f.endswith(".safetensors")]) > 3
    assert diff_same.returncode == 0 and json.loads(diff_same.stdout)["equal"] is True
    assert diff_bf16.returncode == 1 and "max abs" in diff_bf16.stdout
    assert diff_tol.returncode == 0, diff_tol.stdout
    assert verify_dcp.returncode == 0 and json.loads(verify_dcp.stdout)["ok"] is True


def test_cli_bad_input_matrix(tmp_path, tiny_model_dir):
    src = tiny_model_dir("llama", max_shard_size="30KB")
    damaged = corrupt_copies(src, tmp_path)  # as rejected by the Python API
    text_file = tmp_path / "notes.txt"
    text_file.write_text("hello")
    (tmp_path / "empty").mkdir()
    (tmp_path / "exists").mkdir()
    huge = _sparse_huge_checkpoint(tmp_path / "huge")
    out = str(tmp_path / "out")
    matrix = [
        (["inspect", str(tmp_path / "missing")], "does not exist"),
        (["inspect", str(text_file)], "is not a checkpoint"),
        (["verify", str(tmp_path / "empty")], "is not a checkpoint"),
        (["inspect", str(damaged["truncated"][0])], "truncated"),
        (["merge", str(damaged["bad_header"][0]), out], "corrupt safetensors header"),
        (["merge", str(damaged["header_length"][0]), out], "corrupt or truncated"),
        (["inspect", str(damaged["missing_file"][0])], "names file(s) that do not exist"),
        (["diff", str(damaged["missing_tensor"][0]), str(src)], "'model.ghost.weight'"),
        (["merge", str(src), out, "--dtype", "int3"], "unsupported dtype 'int3'"),
        (["reshard", str(src), out, "--max-shard-size", "5XB"], "'5XB' is not understood"),
        (["merge", str(src), str(src / "nested")], "inside the source"),
        (["merge", str(src), str(tmp_path / "exists")], "exists; pass overwrite=True"),
        (["merge", str(huge), out], "not enough free disk"),
    ]
    results = _run_all([args for args, _ in matrix])
    for (args, message), result in zip(matrix, results):
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert "Traceback" not in result.stderr, (args, result.stderr)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (args, result.stderr)
        assert message in lines[0], (args, lines[0])
    assert not Path(out).exists()  # nothing written on any failure
    assert sorted(p.name for p in src.iterdir()) == sorted(
        p.name for p in damaged["truncated"][0].iterdir()
    )  # the source is untouched

    truncated = _run_all([["verify", str(damaged["truncated"][0]), "--json"]])[0]
    assert truncated.returncode == 1 and "truncated" in json.loads(truncated.stdout)["problems"][0]


def test_cli_import_is_light():
    probe = "import sys, automodel.ckpt.cli; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.stdout.strip() == "False", result.stderr
