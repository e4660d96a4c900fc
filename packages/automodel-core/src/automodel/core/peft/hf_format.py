"""Adapters on disk in the Hugging Face peft format: ``adapter_model.safetensors`` + ``adapter_config.json``.

Key names are peft's: ``base_model.model.<module>.lora_A.weight``, ``...lora_B.weight`` and, for DoRA,
``...lora_magnitude_vector``; ``<module>`` is the layer's qualified name in the transformers model,
or for fused MoE experts the Hub's per-expert module (``...block_sparse_moe.experts.3.w1``).
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

from automodel.core.peft.apply import adapter_modules, apply_peft, expert_adapters, reshard_fsdp
from automodel.core.peft.config import LoraConfig
from automodel.core.peft.experts import ExpertsLora, per_expert_module_names
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
    experts = expert_adapters(model)
    if not modules and not experts:
        raise ValueError(
            f"{type(model).__name__} has no LoRA adapters to save; apply_peft(model, config) first"
        )
    tensors = {
        key: _full_tensor(getattr(lora, param)).detach().to("cpu").contiguous()
        for name, lora in modules.items()
        for param, key in _file_keys(name, lora).items()
    }
    model_type = _model_type(model)
    for name, expert_lora in experts.items():
        for param, expert, key in _expert_file_keys(model_type, name, expert_lora):
            full = _full_tensor(getattr(expert_lora, param)).detach()
            tensors[key] = full[expert].to("cpu").contiguous()
    path = Path(path)
    if _is_rank_zero():
        from safetensors.torch import save_file

        path.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(path / ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
        config = _peft_config_dict(model, modules, experts, base_model_name_or_path)
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
    if not adapter_modules(model) and not expert_adapters(model):
        apply_peft(model, LoraConfig.from_peft(json.loads(config_file.read_text())))
    from safetensors.torch import load_file

    state = {_strip_prefix(k): v for k, v in load_file(str(weights_file)).items()}
    # file key -> (module holding the tensor, parameter name, expert index or None)
    expected: dict[str, tuple[Any, str, int | None]] = {}
    for name, lora in adapter_modules(model).items():
        for param, key in _file_keys(name, lora).items():
            expected[_strip_prefix(key)] = (lora, param, None)
    model_type = _model_type(model)
    for name, expert_lora in expert_adapters(model).items():
        for param, expert, key in _expert_file_keys(model_type, name, expert_lora):
            expected[_strip_prefix(key)] = (expert_lora, param, expert)
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
    stacked: dict[tuple[int, str], list[torch.Tensor | None]] = {}
    with torch.no_grad():
        for key, (module, param, index) in expected.items():
            if index is None:
                _copy_full_into(getattr(module, param), state[key], key)
                continue
            slots = stacked.setdefault((id(module), param), [None] * int(module.num_experts))
            slots[index] = state[key]
            if all(t is not None for t in slots):  # every expert read: one write per parameter
                full = torch.stack([t for t in slots if t is not None])
                _copy_full_into(getattr(module, param), full, key)
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


def _model_type(model: nn.Module) -> str:
    return str(getattr(getattr(model, "config", None), "model_type", ""))


def _expert_file_keys(model_type: str, name: str, lora: ExpertsLora) -> list[tuple[str, int, str]]:
    """Returns ``(parameter, expert, file key)`` of every per-expert tensor of ``lora``."""
    out = []
    for proj in lora.projections:
        modules = per_expert_module_names(model_type, name, lora.num_experts, proj)
        for expert, module in enumerate(modules):
            out.append((f"lora_A_{proj}", expert, f"{_PREFIX}{module}.lora_A.weight"))
            out.append((f"lora_B_{proj}", expert, f"{_PREFIX}{module}.lora_B.weight"))
    return out


def _strip_prefix(key: str) -> str:
    return key[len(_PREFIX) :] if key.startswith(_PREFIX) else key


def _accept_legacy_magnitude(key: str, expected: dict[str, Any]) -> str:
    # Some peft releases wrote the DoRA magnitude as "...lora_magnitude_vector.weight".
    legacy = ".lora_magnitude_vector.weight"
    if key.endswith(legacy) and key not in expected:
        return key[: -len(".weight")]
    return key


def _peft_config_dict(
    model: nn.Module,
    modules: dict[str, LoraLinear],
    experts: dict[str, ExpertsLora],
    base_model_name_or_path: str | None,
) -> dict[str, Any]:
    settings = {
        name: (lora.rank, lora.alpha, lora.dropout, lora.use_dora, lora.use_rslora)
        for name, lora in modules.items()
    }
    settings.update(
        {name: (e.rank, e.alpha, 0.0, False, e.use_rslora) for name, e in experts.items()}
    )
    first_setting = next(iter(settings.values()))
    for name, same in settings.items():
        if same != first_setting:
            raise ValueError(
                f"adapter of {name!r} (rank/alpha/dropout/DoRA/rsLoRA {same}) differs from the "
                "others; the peft format written here needs one setting for all layers"
            )
    rank, alpha, dropout, use_dora, use_rslora = first_setting
    model_type = _model_type(model)
    targets = sorted(modules) + sorted(
        module
        for name, e in experts.items()
        for proj in e.projections
        for module in per_expert_module_names(model_type, name, e.num_experts, proj)
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
        "r": rank,
        "lora_alpha": int(alpha) if float(alpha).is_integer() else alpha,
        "lora_dropout": dropout,
        # Exact names, as peft itself writes after resolving "all-linear": no rule to re-interpret.
        # MoE experts appear as the Hub's per-expert modules (peft converts them on load).
        "target_modules": targets,
        "exclude_modules": None,
        "use_dora": use_dora,
        "use_rslora": use_rslora,
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
