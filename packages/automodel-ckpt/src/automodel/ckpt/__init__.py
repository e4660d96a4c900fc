"""automodel.ckpt: distributed save/load in the Hugging Face format, training checkpoints, and
streaming merge/reshard/convert/inspect/verify/diff tools (CLI: ``automodel-ckpt``).

Names are imported on first use (PEP 562) so that ``automodel-ckpt --help`` starts without torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_EXPORTS = {
    "CheckpointError": "automodel.ckpt.errors",
    "CheckpointManager": "automodel.ckpt.manager",
    "CheckpointSummary": "automodel.ckpt.inspection",
    "DiffReport": "automodel.ckpt.comparison",
    "KeyMap": "automodel.ckpt.key_map",
    "LoadResult": "automodel.ckpt.loading",
    "RenameKeys": "automodel.ckpt.key_map",
    "TensorDiff": "automodel.ckpt.comparison",
    "TensorSummary": "automodel.ckpt.inspection",
    "VerifyReport": "automodel.ckpt.verification",
    "convert": "automodel.ckpt.rewrite",
    "diff": "automodel.ckpt.comparison",
    "inspect": "automodel.ckpt.inspection",
    "load": "automodel.ckpt.loading",
    "merge": "automodel.ckpt.rewrite",
    "reshard": "automodel.ckpt.rewrite",
    "save": "automodel.ckpt.saving",
    "verify": "automodel.ckpt.verification",
}

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "CheckpointSummary",
    "DiffReport",
    "KeyMap",
    "LoadResult",
    "RenameKeys",
    "TensorDiff",
    "TensorSummary",
    "VerifyReport",
    "__version__",
    "convert",
    "diff",
    "inspect",
    "load",
    "merge",
    "reshard",
    "save",
    "verify",
]

if TYPE_CHECKING:
    from automodel.ckpt.comparison import DiffReport, TensorDiff, diff
    from automodel.ckpt.errors import CheckpointError
    from automodel.ckpt.inspection import CheckpointSummary, TensorSummary, inspect
    from automodel.ckpt.key_map import KeyMap, RenameKeys
    from automodel.ckpt.loading import LoadResult, load
    from automodel.ckpt.manager import CheckpointManager
    from automodel.ckpt.rewrite import convert, merge, reshard
    from automodel.ckpt.saving import save
    from automodel.ckpt.verification import VerifyReport, verify


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'automodel.ckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
