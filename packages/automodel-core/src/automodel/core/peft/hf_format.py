"""Adapters on disk in the Hugging Face peft format: ``adapter_model.safetensors`` + ``adapter_config.json``.

Key names are peft's: ``base_model.model.<module>.lora_A.weight``, ``...lora_B.weight`` and, for DoRA,
``...lora_magnitude_vector``; ``<module>`` is the layer's qualified name in the transformers model.
So an adapter saved here loads with ``peft.PeftModel.from_pretrained(base, path)`` (and in vLLM),
and one saved by peft loads here with ``load_adapter``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from automodel.core.peft.apply import adapter_modules, apply_peft, reshard_fsdp
from automodel.core.peft.config import LoraConfig
from automodel.core.peft.lora_linear import LoraLinear, _assign_full

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
_PREFIX = "base_model.model."
# our parameter name -> the suffix peft writes after the module name
_FILE_SUFFIX = {
    "lora_A": "lora_A.weight",
    "lora_B": "lora_B.weight",
    "lora_magnitude_vector": "lora_magnitude_vector",
}
_PEFT_FORMAT_VERSION = "0.17.0"  # oldest peft whose loader we test against (the extra's floor)


def save_adapter(
    model: nn.Module, path: str | os.PathLike[str], *, base_model_name_or_path: str | None = None
) -> Path:
    """Returns ``path`` after writing the model's adapter there in the peft format.

    Works on sharded models too (FSDP2 / TP DTensors are gathered): every rank must call it, rank 0
    writes. Only adapter tensors are written; the base model stays where it was loaded from.

    Args:
        model: a model with adapters (``apply_peft`` / ``load_adapter``).
        path: output directory (created).
        base_model_name_or_path: recorded in ``adapter_config.json``; defaults to the model's
            ``name_or_path`` (what ``from_pretrained`` loaded).

    Returns:
        ``path`` as a ``Path``.

    Example:
        >>> save_adapter(model, "out/adapter")   # doctest: +SKIP
        >>> peft.PeftModel.from_pretrained(base, "out/adapter")   # doctest: +SKIP
    """
    modules = adapter_modules(model)
    if not modules:
        raise ValueError(
            f"{type(model).__name__} has no LoRA adapters to save; apply_peft(model, config) first"
        )
    tensors = {
        key: _full_tensor(getattr(lora, param)).detach().to("cpu").contiguous()
        for name, lora in modules.items()
        for param, key in _file_keys(name, lora).items()
    }
    path = Path(path)
    if _is_rank_zero():
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        config = _peft_config_dict(model, modules, base_model_name_or_path)
        (path / ADAPTER_CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    _barrier()
    return path


def load_adapter(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Returns ``model`` with the peft-format adapter in ``path`` loaded (applied first if needed).

    If the model has no adapters yet they are created from ``adapter_config.json`` (targets, rank,
    alpha, DoRA...). Adapters written by peft or by ``save_adapter`` both load. Sharded (DTensor)
    adapters receive their own slice.

    Args:
        model: the base model (a transformers model whose module names match the adapter's).
        path: a directory holding ``adapter_config.json`` and ``adapter_model.safetensors``.

    Returns:
        The same ``model`` object.

    Raises:
        ValueError: files missing, tensors that match no adapted layer or have the wrong shape,
            or a peft feature automodel does not implement.

    Example:
        >>> model = load_adapter(AutoModelForCausalLM.from_pretrained(base), "out/adapter")  # doctest: +SKIP
    """
    path = Path(path)
    config_file, weights_file = path / ADAPTER_CONFIG_NAME, path / ADAPTER_WEIGHTS_NAME
    for needed in (config_file, weights_file):
        if not needed.is_file():
            raise ValueError(
                f"load_adapter({str(path)!r}): {needed.name} not found; expected a directory "
                "written by save_adapter() or peft's save_pretrained() (safetensors format)"
            )
    if not adapter_modules(model):
        apply_peft(model, LoraConfig.from_peft(json.loads(config_file.read_text())))
    from safetensors.torch import load_file

    state = {_strip_prefix(k): v for k, v in load_file(str(weights_file)).items()}
    expected: dict[str, tuple[LoraLinear, str]] = {}
    for name, lora in adapter_modules(model).items():
        for param, key in _file_keys(name, lora).items():
            expected[_strip_prefix(key)] = (lora, param)
    state = {_accept_legacy_magnitude(k, expected): v for k, v in state.items()}
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    if unexpected or missing:
        raise ValueError(
            f"adapter in {str(path)!r} does not fit {type(model).__name__}: "
            f"{len(unexpected)} tensor(s) match no adapted layer (e.g. {unexpected[:3]}), "
            f"{len(missing)} adapter tensor(s) missing from the file (e.g. {missing[:3]}); "
            "was it trained on another architecture, or with other target_modules / use_dora?"
        )
    reshard_fsdp(model)
    with torch.no_grad():
        for key, (lora, param) in expected.items():
            _copy_full_into(getattr(lora, param), state[key], key)
    return model


def save_pretrained_adapter(model: nn.Module, path: str | os.PathLike[str]) -> bool:
    """Returns True after saving the adapter of a model that has one, False (writing nothing) otherwise.

    The hook for ``save_pretrained``: a model with adapters saves like a ``peft.PeftModel`` does,
    adapter files only; the caller writes the full weights only when this returns False.

    Example:
        >>> if not save_pretrained_adapter(model, path):   # doctest: +SKIP
        ...     write_full_weights(model, path)
    """
    if not adapter_modules(model):
        return False
    save_adapter(model, path)
    return True


def _file_keys(name: str, lora: LoraLinear) -> dict[str, str]:
    return {
        param: f"{_PREFIX}{name}.{suffix}"
        for param, suffix in _FILE_SUFFIX.items()
        if param in lora._parameters
    }


def _strip_prefix(key: str) -> str:
    return key[len(_PREFIX) :] if key.startswith(_PREFIX) else key


def _accept_legacy_magnitude(key: str, expected: dict[str, Any]) -> str:
    # Some peft releases wrote the DoRA magnitude as "...lora_magnitude_vector.weight".
    legacy = ".lora_magnitude_vector.weight"
    if key.endswith(legacy) and key not in expected:
        return key[: -len(".weight")]
    return key


def _peft_config_dict(
    model: nn.Module, modules: dict[str, LoraLinear], base_model_name_or_path: str | None
) -> dict[str, Any]:
    first = next(iter(modules.values()))
    for name, lora in modules.items():
        same = (lora.rank, lora.alpha, lora.dropout, lora.use_dora, lora.use_rslora)
        if same != (first.rank, first.alpha, first.dropout, first.use_dora, first.use_rslora):
            raise ValueError(
                f"adapter of {name!r} (rank/alpha/dropout/DoRA/rsLoRA {same}) differs from the "
                "others; the peft format written here needs one setting for all layers"
            )
    config: LoraConfig | None = getattr(model, "_automodel_lora_config", None)
    task_type = config.task_type if config is not None else None
    if task_type is None:
        task_type = "CAUSAL_LM" if type(model).__name__.endswith("ForCausalLM") else None
    if base_model_name_or_path is None:
        base_model_name_or_path = getattr(model, "name_or_path", None) or None
    return {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "r": first.rank,
        "lora_alpha": int(first.alpha) if float(first.alpha).is_integer() else first.alpha,
        "lora_dropout": first.dropout,
        # Exact names, as peft itself writes after resolving "all-linear": no rule to re-interpret.
        "target_modules": sorted(modules),
        "exclude_modules": None,
        "use_dora": first.use_dora,
        "use_rslora": first.use_rslora,
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "peft_version": _PEFT_FORMAT_VERSION,
    }


def _full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def _copy_full_into(param: torch.Tensor, full: torch.Tensor, key: str) -> None:
    if tuple(param.shape) != tuple(full.shape):
        raise ValueError(
            f"adapter tensor {key!r} has shape {tuple(full.shape)}, the model expects "
            f"{tuple(param.shape)}: the adapter's rank or the model size differs"
        )
    _assign_full(param, full.to(dtype=param.dtype))


def _is_rank_zero() -> bool:
    return not (torch.distributed.is_available() and torch.distributed.is_initialized()) or (
        torch.distributed.get_rank() == 0
    )


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
