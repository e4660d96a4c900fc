"""Runs several `automodel` CLI invocations in one process (saves the torch import per run).

    python tests/recipes/_drive_cli.py '[["pretrain", "training.max_steps=2"], ["benchmark"]]'

Each invocation goes through the real click entry point; its exit code is printed as
``== exit <code> ==`` after a ``== run <i> ==`` header, so a test can split the output per run.
"""

from __future__ import annotations

import json
import sys

from automodel.recipes.cli import main

if __name__ == "__main__":
    for i, args in enumerate(json.loads(sys.argv[1])):
        print(f"== run {i} ==", flush=True)
        code = 0
        try:
            main(args, standalone_mode=False)
        except SystemExit as e:
            code = int(e.code or 0)
        print(f"== exit {code} ==", flush=True)
