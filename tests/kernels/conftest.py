"""Fixtures for the kernel tests: the Triton CPU interpreter and the bf16 relative-error check."""

from __future__ import annotations

import importlib.util
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from harness.distributed import run_distributed

# The Triton parity tests and their workers (test module, function). The workers of every selected
# test run in ONE TRITON_INTERPRET=1 process: a process start (torch, triton, transformers imports)
# costs seconds on CI's two cores.
_INTERPRETER_WORKERS = {
    "test_triton_gated_activations_match_reference": (
        "test_activations.py",
        "_triton_activations_worker",
    ),
    "test_triton_cross_entropy_matches_reference": (
        "test_cross_entropy.py",
        "_triton_cross_entropy_worker",
    ),
    "test_triton_chunked_matches_full_logits": (
        "test_linear_cross_entropy.py",
        "_triton_linear_ce_worker",
    ),
    "test_triton_norms_match_reference": ("test_norm.py", "_triton_norm_worker"),
    "test_triton_apply_rotary_matches_reference": ("test_rope.py", "_triton_rope_worker"),
}


def _run_interpreter_workers(
    rank: int, world_size: int, workers: dict[str, tuple[str, str]]
) -> dict[str, Any]:
    """Returns {test name: its worker's result, or the traceback the worker raised}."""
    results: dict[str, Any] = {}
    for test, (file, function) in workers.items():
        try:
            spec = importlib.util.spec_from_file_location(
                f"_interpreted_{Path(file).stem}", Path(__file__).parent / file
            )
            assert spec is not None and spec.loader is not None
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
            results[test] = getattr(module, function)(rank, world_size)
        except Exception:
            results[test] = traceback.format_exc()
    return results


@pytest.fixture(scope="session")
def _interpreter_results(request: pytest.FixtureRequest) -> dict[str, Any]:
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: the gpu tests cover the compiled Triton kernels")
    selected = {getattr(item, "originalname", None) for item in request.session.items}
    workers = {test: w for test, w in _INTERPRETER_WORKERS.items() if test in selected}
    env = {"TRITON_INTERPRET": "1"}
    results = run_distributed(
        _run_interpreter_workers, 1, init_process_group=False, env=env, timeout=900, workers=workers
    )
    return results[0]


@pytest.fixture
def triton_pairs(request: pytest.FixtureRequest, _interpreter_results: dict[str, Any]) -> Any:
    """This test's ``(name, triton, reference)`` pairs, computed under TRITON_INTERPRET=1.

    The test's worker is listed in ``_INTERPRETER_WORKERS``; all selected tests' workers run in one
    fresh process (Triton decides at import whether kernels are interpreted, hence the process).
    Skips without Triton, and on CUDA machines, where the ``gpu`` tests run the compiled kernels.
    """
    result = _interpreter_results[request.node.originalname]
    if isinstance(result, str):
        pytest.fail(f"the interpreter worker raised:\n{result}")
    return result


@pytest.fixture
def triton_interpreter() -> Callable[..., Any]:
    """``run(fn, **kwargs)``: ``fn(0, 1, **kwargs)`` in a fresh process under TRITON_INTERPRET=1.

    Triton decides at decoration time, including for its own ``tl.sum``/``tl.sigmoid``, whether a
    kernel is compiled or interpreted, so the variable must be set before Triton is first imported:
    hence a fresh process. ``fn`` is a module-level function; its return value comes back. Skips
    without Triton, and on CUDA machines, where the ``gpu`` tests run the compiled kernels.
    """
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: the gpu tests cover the compiled Triton kernels")

    def run(fn: Callable[..., Any], **kwargs: Any) -> Any:
        env = {"TRITON_INTERPRET": "1"}
        return run_distributed(fn, 1, init_process_group=False, env=env, **kwargs)[0]

    return run


@pytest.fixture
def assert_pairs_close() -> Callable[..., None]:
    """``check(pairs, rtol=, atol=)``: every ``(name, got, want)`` close, the culprit named."""

    def check(pairs: list[tuple[str, torch.Tensor, torch.Tensor]], **tolerances: Any) -> None:
        assert pairs, "no results to compare"
        for name, got, want in pairs:
            assert got.dtype == want.dtype, (name, got.dtype, want.dtype)
            torch.testing.assert_close(got, want, msg=lambda m, n=name: f"{n}: {m}", **tolerances)

    return check


def _relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.detach().double(), ref.detach().double()
    return float((out - ref).norm() / ref.norm())


@pytest.fixture
def assert_rel_close() -> Callable[..., None]:
    """``check(out, ref, limit, name)``: finite, and ``‖out − ref‖ / ‖ref‖ <= limit``."""

    def check(out: torch.Tensor, ref: torch.Tensor, limit: float, name: str = "") -> None:
        assert out.shape == ref.shape, (name, out.shape, ref.shape)
        assert torch.isfinite(out).all(), f"{name}: non-finite values"
        assert ref.detach().double().norm() > 0, f"{name}: the reference is all zeros"
        err = _relative_error(out, ref)
        assert err <= limit, f"{name}: relative error {err:.3e} > {limit:.0e}"

    return check
