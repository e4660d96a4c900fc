"""Child process of test_memory.py (not a test): runs the streaming tools on SRC and prints, as JSON,
the peak RSS growth (bytes) of each step over the process's peak before it."""

from __future__ import annotations

import json
import resource
import sys
import tempfile
from pathlib import Path

from automodel.ckpt import convert, merge, reshard


def _peak_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def main() -> None:
    src, shard = Path(sys.argv[1]), sys.argv[2]
    out = Path(tempfile.mkdtemp(dir=src.parent))
    steps = {
        "reshard (byte copy)": lambda: reshard(src, out / "copy", max_shard_size=shard),
        "reshard to bf16 (tensor reads)": lambda: reshard(
            src, out / "bf16", max_shard_size=shard, dtype="bf16"
        ),
        "convert to dcp": lambda: convert(src, out / "dcp", to="dcp"),
        "merge from dcp": lambda: merge(out / "dcp", out / "merged", max_shard_size=shard),
    }
    growth = {}
    for name, step in steps.items():
        before = _peak_bytes()
        step()
        growth[name] = _peak_bytes() - before
    print(json.dumps(growth))


if __name__ == "__main__":
    main()
