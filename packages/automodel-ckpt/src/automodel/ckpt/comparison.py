"""``diff``: compare two checkpoints key by key and value by value, one tensor pair at a time."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from automodel.ckpt._sources import open_source

__all__ = ["DiffReport", "TensorDiff", "diff"]


@dataclass(frozen=True)
class TensorDiff:
    """Per-tensor comparison: largest absolute and relative difference, and the verdict."""

    name: str
    max_abs: float
    max_rel: float
    equal: bool
    dtype_a: str
    dtype_b: str


@dataclass
class DiffReport:
    """Keys only in ``a`` or only in ``b``, shape mismatches, and per-tensor differences."""

    a: str
    b: str
    atol: float
    rtol: float
    only_in_a: list[str] = field(default_factory=list)
    only_in_b: list[str] = field(default_factory=list)
    shape_mismatches: list[str] = field(default_factory=list)
    tensors: list[TensorDiff] = field(default_factory=list)

    @property
    def equal(self) -> bool:
        """Whether both hold the same keys and shapes and every value is within tolerance."""
        return (
            not self.only_in_a
            and not self.only_in_b
            and not self.shape_mismatches
            and all(t.equal for t in self.tensors)
        )

    @property
    def differing(self) -> list[TensorDiff]:
        return [t for t in self.tensors if not t.equal]

    def as_dict(self) -> dict[str, Any]:
        """Returns the report as a JSON-ready dict (with ``equal``)."""
        return {**asdict(self), "equal": self.equal}


def diff(
    a: str | os.PathLike[str],
    b: str | os.PathLike[str],
    *,
    atol: float = 0.0,
    rtol: float = 0.0,
    progress: Callable[[int], None] | None = None,
) -> DiffReport:
    """Returns how checkpoints ``a`` and ``b`` differ (any formats, e.g. a DCP folder vs a HF folder).

    Two values match when ``|x_a - x_b| <= atol + rtol * |x_b|`` (``torch.isclose``; NaNs match
    NaNs). Values are compared in float64 (integers exactly), so a dtype difference alone is not a
    difference when the values agree; it is reported in ``TensorDiff.dtype_a``/``dtype_b``.
    ``max_rel`` is ``max |x_a - x_b| / |x_b|`` over elements where ``x_b != 0``.

    Example:
        >>> import tempfile, torch
        >>> from automodel.ckpt import save, diff
        >>> a = save({"w": torch.ones(3)}, tempfile.mkdtemp())
        >>> b = save({"w": torch.ones(3) + 1e-7}, tempfile.mkdtemp())
        >>> diff(a, b).equal, diff(a, b, atol=1e-6).equal
        (False, True)
    """
    report = DiffReport(str(a), str(b), atol, rtol)
    with open_source(Path(a)) as sa, open_source(Path(b)) as sb:
        report.only_in_a = [k for k in sa.tensors if k not in sb.tensors]
        report.only_in_b = [k for k in sb.tensors if k not in sa.tensors]
        for name, info_a in sa.tensors.items():
            info_b = sb.tensors.get(name)
            if info_b is None:
                continue
            if info_a.shape != info_b.shape:
                report.shape_mismatches.append(
                    f"{name}: {list(info_a.shape)} vs {list(info_b.shape)}"
                )
                continue
            report.tensors.append(_compare(name, sa.read(name), sb.read(name), atol, rtol))
            if progress is not None:
                progress(info_a.nbytes + info_b.nbytes)
    return report


def _compare(name: str, x: torch.Tensor, y: torch.Tensor, atol: float, rtol: float) -> TensorDiff:
    exact_ints = not x.is_floating_point() and not y.is_floating_point()
    xd, yd = (x.long(), y.long()) if exact_ints else (x.double(), y.double())
    if xd.numel() == 0:
        return TensorDiff(name, 0.0, 0.0, True, str(x.dtype), str(y.dtype))
    delta = (xd - yd).abs()
    both_nan = torch.isnan(xd) & torch.isnan(yd) if not exact_ints else None
    if both_nan is not None:
        delta = torch.where(both_nan, torch.zeros_like(delta), delta)
    max_abs = float(delta.max())
    nonzero = yd != 0
    max_rel = float((delta[nonzero] / yd[nonzero].abs()).max()) if bool(nonzero.any()) else 0.0
    if exact_ints:
        equal = bool((delta <= atol + rtol * yd.abs()).all())
    else:
        equal = bool(torch.isclose(xd, yd, rtol=rtol, atol=atol, equal_nan=True).all())
    return TensorDiff(name, max_abs, max_rel, equal, str(x.dtype), str(y.dtype))
