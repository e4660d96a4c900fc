"""FP8 training from the `fp8` config section: torchao Float8Linear layers via automodel.kernels."""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch

from automodel.recipes.config import ConfigError, Fp8Section


def check_fp8(cfg: Fp8Section, device: torch.device) -> None:
    """Returns when ``fp8.enabled`` can run on ``device`` (or is off); raises a one-line error if not.

    Called right after the runtime is known, so a CPU run or a missing extra fails in a second,
    not after the model has loaded.

    Raises:
        ConfigError: fp8 is enabled without a CUDA GPU of compute capability 8.9+ or without
            torchao (the ``automodel-kernels[fp8]`` extra).
    """
    if not cfg.enabled:
        return
    missing = []
    if device.type != "cuda":
        missing.append(
            f"a CUDA GPU of compute capability 8.9+ (H100/H200), this run is on {device}"
        )
    elif torch.cuda.get_device_capability(device) < (8, 9):
        major, minor = torch.cuda.get_device_capability(device)
        missing.append(f"a GPU of compute capability 8.9+, {device} has {major}.{minor}")
    if importlib.util.find_spec("torchao") is None:
        missing.append("torchao, the fp8 extra: pip install 'automodel-kernels[fp8]'")
    if missing:
        raise ConfigError(
            f"fp8.enabled=true needs {' and '.join(missing)}; set fp8.enabled=false to train in "
            "bf16"
        )


def apply_fp8(
    model: Any, cfg: Fp8Section, device: torch.device, log: Callable[[str], None] = print
) -> Any:
    """Returns ``model`` with its large linear layers swapped for FP8 ones when ``fp8.enabled``.

    Runs before LoRA and before parallelization (FSDP then shards the FP8 modules like any other).
    Linears named in ``fp8.filter_fqns`` or smaller than ``fp8.min_features`` stay in bf16.
    """
    if not cfg.enabled:
        return model
    check_fp8(cfg, device)
    from automodel.kernels import convert_to_float8

    linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    model = convert_to_float8(
        model, filter_fqns=cfg.filter_fqns, min_features=cfg.min_features, recipe=cfg.recipe
    )
    converted = sum(type(m).__name__ == "Float8Linear" for m in model.modules())
    log(f"fp8: {converted} of {linears} linear layers use FP8 matmuls ({cfg.recipe} scaling)")
    return model
