"""Fixtures for the kernel tests: the Triton CPU interpreter and the bf16 relative-error check."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from harness.distributed import run_distributed


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
