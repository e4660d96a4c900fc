"""The opening every training recipe shares: runtime, run folder, metrics logger, seed."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.distributed as dist

from automodel.recipes._fp8 import check_fp8
from automodel.recipes.config import RecipeConfig
from automodel.recipes.train import MetricsLogger, RunDir, Runtime, setup_runtime


class RunStart(NamedTuple):
    """What :func:`start_run` returns: the process runtime, the run folder and the logger."""

    rt: Runtime
    out: RunDir
    metrics: MetricsLogger


def start_run(cfg: RecipeConfig) -> RunStart:
    """Returns the runtime, the prepared run folder and the metrics logger of a training run.

    In order: the process group and device, the fp8 check (fails in a second rather than after
    loading the model), the output folder's check on every rank (a finished or foreign run is
    refused before anything is written) and its preparation on the main rank, the logger (which
    records the resolved config) and the seed.
    """
    t = cfg.training
    rt = setup_runtime(t.device)
    check_fp8(cfg.fp8, rt.device)
    out = RunDir(t.output_dir)
    out.check(cfg)
    if rt.distributed:
        dist.barrier()
    if rt.is_main:
        out.prepare(cfg)
    metrics = MetricsLogger(
        cfg.logging, out.root, enabled=rt.is_main, config=cfg.model_dump(mode="json")
    )
    torch.manual_seed(t.seed)
    return RunStart(rt, out, metrics)
