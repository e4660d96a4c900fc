"""Damaged copies of a sharded HF checkpoint, shared by the Python-API and CLI tests (not a test)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def corrupt_copies(src: Path, tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Returns name -> (folder, expected message) for each kind of damage."""
    cases = {}

    def copy(name):
        dst = tmp_path / name
        shutil.copytree(src, dst)
        return dst

    shards = sorted(p.name for p in src.glob("model-*.safetensors"))
    d = copy("truncated")
    with open(d / shards[1], "r+b") as f:
        f.truncate(os.path.getsize(d / shards[1]) - 10)
    cases["truncated"] = (d, "truncated")
    d = copy("bad_header")
    with open(d / shards[0], "r+b") as f:
        f.seek(8)
        f.write(b"#garbage")
    cases["bad_header"] = (d, "corrupt safetensors header")
    d = copy("header_length")
    with open(d / shards[0], "r+b") as f:
        f.write((10**12).to_bytes(8, "little"))
    cases["header_length"] = (d, "corrupt or truncated safetensors header")
    d = copy("missing_file")
    (d / shards[-1]).unlink()
    cases["missing_file"] = (d, "names file\\(s\\) that do not exist")
    d = copy("missing_tensor")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.ghost.weight"] = shards[0]
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    cases["missing_tensor"] = (d, "'model.ghost.weight'")
    return cases
