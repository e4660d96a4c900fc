"""Entry point of one rank launched by ``harness.distributed.run_distributed`` (not for direct use)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main(source: str, qualname: str, tmp: str, init: str) -> None:
    spec = importlib.util.spec_from_file_location(f"_dist_target_{Path(source).stem}", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    fn = module
    for part in qualname.split("."):
        fn = getattr(fn, part)
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    kwargs = torch.load(Path(tmp) / "kwargs.pt", weights_only=False)
    if init == "1":
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, **kwargs)
        torch.save(result, Path(tmp) / f"result{rank}.pt")
        if init == "1":
            dist.barrier()  # no rank tears the group down while another still uses it
    finally:
        if init == "1" and dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:5])
