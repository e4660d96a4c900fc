"""Backend selection shared by every op: explicit, deterministic, logged once.

``backend="auto"`` resolves to the op's fast path when the input lives on CUDA and the fast path's
packages are importable, and to the pure-PyTorch reference otherwise. The choice depends on nothing
but the device type and the installed packages, and is logged once per (op, device type, choice).
"""

from __future__ import annotations

import functools
import importlib.util
import logging

import torch

logger = logging.getLogger("automodel.kernels")

BACKENDS = ("auto", "torch", "triton")


@functools.cache
def triton_available() -> bool:
    """Returns True when Triton is importable (CUDA builds of torch ship it)."""
    return importlib.util.find_spec("triton") is not None


@functools.cache
def _log_choice(op: str, device_type: str, choice: str) -> None:
    logger.info("automodel.kernels: %s on %s uses the %r backend", op, device_type, choice)


def resolve_backend(
    op: str,
    backend: str,
    device: torch.device,
    *,
    fast: str = "triton",
    choices: tuple[str, ...] = ("torch", "triton"),
) -> str:
    """Returns the concrete backend (``"torch"``, ``"triton"``, ...) that ``op`` runs with.

    Args:
        op: the op's public name, used in messages and in the log.
        backend: what the caller asked for: ``"auto"`` or one of ``choices``.
        device: the device of the op's main input.
        fast: the backend ``"auto"`` picks on CUDA when its packages are importable.
        choices: the concrete backends this op implements.

    Raises:
        ValueError: ``backend`` is not ``"auto"`` or one of ``choices``, or names ``"triton"`` for
            a tensor that is not on CUDA while the Triton interpreter (TRITON_INTERPRET=1) is off.

    Example:
        >>> resolve_backend("rms_norm", "auto", torch.device("cpu"))
        'torch'
    """
    if backend != "auto" and backend not in choices:
        raise ValueError(
            f"{op}: backend={backend!r} is not supported; expected 'auto' or one of {list(choices)}"
        )
    if backend == "auto":
        choice = (
            fast
            if device.type == "cuda" and fast in choices and _fast_importable(fast)
            else "torch"
        )
    else:
        choice = backend
    if choice == "triton" and device.type != "cuda" and not _triton_interpreter_on():
        raise ValueError(
            f"{op}: backend='triton' needs CUDA tensors (got {device.type}); use backend='torch' or "
            "'auto', or set TRITON_INTERPRET=1 to run Triton kernels on the CPU for testing"
        )
    if not torch.compiler.is_compiling():  # a functools.cache call would break the graph
        _log_choice(op, device.type, choice)
    return choice


def _fast_importable(fast: str) -> bool:
    if fast == "triton":
        return triton_available()
    return importlib.util.find_spec(fast.replace("-", "_")) is not None


def _triton_interpreter_on() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET", "0") == "1"
