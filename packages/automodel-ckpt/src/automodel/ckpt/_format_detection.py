"""Which checkpoint format a path holds, decided from file names alone (no torch import, so the CLI
rejects bad paths instantly)."""

from __future__ import annotations

from pathlib import Path

from automodel.ckpt.errors import CheckpointError


def detect_format(path: Path) -> str:
    """Returns "safetensors", "sharded-safetensors" or "dcp" for checkpoint ``path``."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a checkpoint folder or file")
    if path.is_file():
        if path.suffix == ".safetensors":
            return "safetensors"
        raise CheckpointError(
            f"{path} is not a checkpoint: expected a folder or a .safetensors file"
        )
    if (path / ".metadata").is_file():
        return "dcp"
    files = sorted(path.glob("*.safetensors"))
    if files:
        if not list(path.glob("*.safetensors.index.json")) and all(
            f.name.startswith("shard-") for f in files
        ):
            return "sharded-safetensors"
        return "safetensors"
    if (path / "sharded").is_dir() and list((path / "sharded").glob("shard-*.safetensors")):
        return "sharded-safetensors"
    raise CheckpointError(
        f"{path} is not a checkpoint: no *.safetensors files, no safetensors index and no DCP "
        ".metadata found"
    )
