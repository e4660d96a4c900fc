"""Child process of test_crash.py (not a test): saves checkpoints and dies by SIGKILL on cue.

python _crash_child.py ROOT armed FUNCTION MATCH NTH
    saves step 1, then arms ``os.FUNCTION`` to SIGKILL this process on its NTH call whose
    arguments mention MATCH ("*" = any call), then saves step 2 (prints "survived" if never hit)
python _crash_child.py ROOT loop
    saves steps 1, 2, 3... forever, printing "saved N" after each (the parent kills it)
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

import torch

from automodel.ckpt import CheckpointManager


def build() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.Linear(256, 16))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(4, 256)).sum().backward()
    optimizer.step()
    return model, optimizer


def save(manager: CheckpointManager, model: Any, optimizer: Any, step: int) -> None:
    with torch.no_grad():
        model[0].bias.fill_(float(step))  # lets the parent check which step it loaded
    manager.save(step, model=model, optimizer=optimizer, extra={"note": f"step {step}"})


def arm(function: str, match: str, nth: int) -> None:
    original = getattr(os, function)
    calls = 0

    def killer(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        if match == "*" or any(match in str(a) for a in args):
            calls += 1
            if calls == nth:
                os.kill(os.getpid(), signal.SIGKILL)
        return original(*args, **kwargs)

    setattr(os, function, killer)


def main() -> None:
    root, mode = sys.argv[1], sys.argv[2]
    model, optimizer = build()
    manager = CheckpointManager(root, keep_last=1, max_shard_size="100KB")
    if mode == "armed":
        save(manager, model, optimizer, 1)
        arm(sys.argv[3], sys.argv[4], int(sys.argv[5]))
        save(manager, model, optimizer, 2)
        print("survived", flush=True)
        return
    step = 1
    while True:
        save(manager, model, optimizer, step)
        print(f"saved {step}", flush=True)
        step += 1


if __name__ == "__main__":
    main()
