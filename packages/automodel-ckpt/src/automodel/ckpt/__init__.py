"""automodel.ckpt: distributed save/load in the Hugging Face format, training checkpoints, and
streaming merge/reshard/convert/inspect/verify/diff tools (CLI: ``automodel-ckpt``)."""

from automodel.ckpt.errors import CheckpointError
from automodel.ckpt.key_map import KeyMap, RenameKeys
from automodel.ckpt.load import LoadResult, load
from automodel.ckpt.manager import CheckpointManager
from automodel.ckpt.save import save

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CheckpointManager",
    "KeyMap",
    "LoadResult",
    "RenameKeys",
    "__version__",
    "load",
    "save",
]
