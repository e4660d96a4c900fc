"""benchmarks/kernels_bench.py's variant list, launch-geometry sweep and table (no GPU needed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "kernels_bench.py"


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("triton")
    spec = importlib.util.spec_from_file_location("kernels_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_variants_add_sweeps_per_shape_and_copy_only_once(bench) -> None:
    variants = bench._variants(
        ["copy", "rms_norm"],
        ["8b", "1b"],
        ["eager", "automodel"],
        ["rms_norm:automodel@num_stages=2"],
    )
    assert variants == [
        ("copy", "8b", "eager"),
        ("rms_norm", "8b", "eager"),
        ("rms_norm", "8b", "automodel"),
        ("rms_norm", "8b", "automodel@num_stages=2"),
        ("copy", "1b", "eager"),
        ("rms_norm", "1b", "eager"),
        ("rms_norm", "1b", "automodel"),
        ("rms_norm", "1b", "automodel@num_stages=2"),
    ]


def test_sweep_sets_the_kernel_modules_tuning(bench, monkeypatch) -> None:
    from automodel.kernels._triton import activations, norm, rope

    for module, name in ((norm, "TUNING"), (rope, "TUNING"), (activations, "TUNING")):
        monkeypatch.setattr(module, name, dict(getattr(module, name)))
    bench._apply_tuning("add_rms_norm", "automodel@programs_per_sm=1+rows_per_step=2")
    bench._apply_tuning("rope", "automodel@num_warps=8")
    bench._apply_tuning("swiglu", "automodel@block=2048+num_warps=8")
    assert (norm.TUNING["programs_per_sm"], norm.TUNING["rows_per_step"]) == (1, 2)
    assert rope.TUNING["num_warps"] == 8
    assert activations.TUNING == {"block": 2048, "num_warps": 8}
    with pytest.raises(ValueError, match="unknown key 'warps'"):
        bench._apply_tuning("rope", "automodel@warps=8")


def test_table_rooflines_from_graph_and_kernel_times(bench) -> None:
    common = {"op": "rms_norm", "shape": "8b", "bytes": 335e6, "gpu": "NVIDIA H100 80GB HBM3"}
    results = [
        {**common, "impl": "eager", "ms": 1.8, "graph_ms": 1.7, "kernel_ms": 1.7, "peak_gib": 0.8},
        {**common, "impl": "automodel", "ms": 0.8, "graph_ms": 0.125, "kernel_ms": 0.1,
         "peak_gib": 0.2},
        {"op": "rope", "shape": "8b", "impl": "liger", "error": "liger_kernel not importable"},
    ]  # fmt: skip
    table = bench._table(results).splitlines()
    # 335 MB in 0.125 ms = 2.68 TB/s = 80% of 3.35 TB/s; in 0.1 ms, 100%; vs eager on graph time.
    assert table[-2] == (
        "| rms_norm | 8b | automodel | 0.800 | 0.125 | 0.100 | 13.60x | 0.200 | 0.25x | 335 | 80% "
        "| 100% |"
    )
    assert table[-1].startswith("| rope | 8b | liger | liger_kernel not importable |")
