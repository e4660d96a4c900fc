"""benchmarks/core_bench.py plumbing on CPU (--smoke): a variant runs in its own process and lands in
the table printed last, peers without their wheels and hung variants get a one-line reason."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "core_bench.py"


def _load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("core_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _main(bench: ModuleType, monkeypatch: pytest.MonkeyPatch, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", [str(BENCH), "--smoke", *args])
    bench.main()


@pytest.mark.slow
def test_smoke_table_with_a_measured_variant_a_skipped_peer_and_a_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    bench = _load_bench()
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.delenv("NEMO_SITE", raising=False)
    _main(bench, monkeypatch, "--variants", "nemo,automodel", "--timeout", "400")
    printed = capsys.readouterr().out.strip().splitlines()
    table = printed[
        printed.index(
            "| variant | tokens/s | vs transformers eager | MFU | peak GiB | loss first -> last |"
        ) :
    ]
    assert printed[-len(table) :] == table  # the table comes last
    rows = {line.split(" | ")[0].lstrip("| "): line for line in table[2:]}
    assert list(rows) == ["NeMo AutoModel 0.7.0", "automodel"]  # fixed order, not run order
    assert "skipped: needs a CUDA peer" in rows["NeMo AutoModel 0.7.0"]
    result = json.loads((tmp_path / "core_automodel.json").read_text())
    assert result["tokens_s"] > 0 and result["device"] == "cpu"
    assert f"{result['first_loss']:.3f} -> {result['last_loss']:.3f}" in rows["automodel"]
    assert (tmp_path / "core_table.md").read_text().strip().endswith(table[-1])

    # a variant that overruns its timeout is killed and reported, the run goes on
    _main(bench, monkeypatch, "--variants", "hf_eager", "--timeout", "0.5")
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("| transformers eager (SDPA) | timed out after 0 s"), last
