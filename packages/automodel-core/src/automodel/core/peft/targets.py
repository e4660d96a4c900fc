"""Which modules of a model an adapter targets: peft's matching rules, reimplemented."""

from __future__ import annotations

import re
from collections.abc import Sequence

from torch import nn

from automodel.core.peft.config import ALL_LINEAR, LoraConfig

# Heads that "all-linear" leaves alone when a model declares no output embeddings (classifiers).
_HEAD_NAMES = ("score", "classifier")


def find_target_modules(model: nn.Module, config: LoraConfig) -> list[str]:
    """Returns the qualified names of the linear layers ``config`` adapts in ``model``, in model order.

    Rules (peft's): ``"all-linear"`` takes every ``nn.Linear`` but the output layer; a list matches
    a name equal to an entry or ending in ``"." + entry``; another string is a full-match regex.
    ``exclude_modules`` removes names by the same rules. A matched module that is not an
    ``nn.Linear`` is an error (peft raises too), as is matching nothing (linears and MoE experts:
    see :func:`find_target_experts`).

    Example:
        >>> m = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
        >>> find_target_modules(m, LoraConfig(target_modules=["0", "2"]))
        ['0', '2']
    """
    output_layers = _output_layer_names(model) if config.target_modules == ALL_LINEAR else set()
    found: list[str] = []
    for name, module in model.named_modules():
        if not name or _matches(config.exclude_modules, name):
            continue
        if config.target_modules == ALL_LINEAR:
            if isinstance(module, nn.Linear) and name not in output_layers:
                found.append(name)
            continue
        if not _matches(config.target_modules, name):
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(
                f"target_modules={config.target_modules!r} matches {name!r}, a "
                f"{type(module).__name__}; LoRA adapts nn.Linear layers only: name the linear "
                "layers inside it (e.g. 'q_proj') or add it to exclude_modules"
            )
        found.append(name)
    if not found and not find_target_experts(model, config):
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        leaf_names = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ValueError(
            f"target_modules={config.target_modules!r} (exclude_modules="
            f"{config.exclude_modules!r}) matches no linear layer of {type(model).__name__}; "
            f"its linear layers are named {leaf_names[:20]}"
        )
    return found


def find_target_experts(model: nn.Module, config: LoraConfig) -> dict[str, tuple[str, ...]]:
    """Returns ``{experts FQN: adapted projections}`` for the fused MoE experts ``config`` targets.

    transformers 5 fuses a layer's experts into one module (``automodel.core.moe``); the targets
    are matched, with the rules of :func:`find_target_modules`, against the per-expert module
    names of the Hub's layout that peft knows: ``model.layers.0.block_sparse_moe.experts.3.w1``
    (Mixtral: ``w1`` gate, ``w3`` up, ``w2`` down) or ``model.layers.0.mlp.experts.3.gate_proj``
    (Qwen-MoE, DeepSeek: ``gate_proj``, ``up_proj``, ``down_proj``). ``"all-linear"`` takes the
    three projections of every experts module (they were linear layers before the fusion).
    A projection targeted for some experts of a module but not all is an error.

    Example:
        >>> find_target_experts(mixtral, LoraConfig(target_modules=["w1", "w3"]))  # doctest: +SKIP
        {'model.layers.0.mlp.experts': ('gate', 'up'), 'model.layers.1.mlp.experts': ('gate', 'up')}
    """
    from automodel.core.moe.grouped_experts import is_experts_module
    from automodel.core.moe.state_dict_adapter import MoEKeyMap

    model_type = str(getattr(getattr(model, "config", None), "model_type", ""))
    found: dict[str, tuple[str, ...]] = {}
    for name, module in model.named_modules():
        if not is_experts_module(module) or _matches(config.exclude_modules, name):
            continue
        num_experts = int(module.gate_up_proj.shape[0])  # type: ignore[union-attr]
        key_map = MoEKeyMap(model_type, num_experts)
        projections = []
        for proj in ("gate", "up", "down"):
            names = [key_map.expert_module(name, e, proj) for e in range(num_experts)]
            hits = [
                n
                for n in names
                if (config.target_modules == ALL_LINEAR or _matches(config.target_modules, n))
                and not _matches(config.exclude_modules, n)
            ]
            if len(hits) == num_experts:
                projections.append(proj)
            elif hits:
                raise ValueError(
                    f"target_modules={config.target_modules!r} adapts {len(hits)} of the "
                    f"{num_experts} experts of {name!r} ({proj} projection, e.g. {hits[0]!r}); "
                    "automodel adapts all experts of a layer or none: target the projection "
                    "name (e.g. 'w1' or 'gate_proj') or exclude the whole experts module"
                )
        if projections:
            found[name] = tuple(projections)
    return found


def _matches(patterns: str | Sequence[str] | None, name: str) -> bool:
    if not patterns:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _output_layer_names(model: nn.Module) -> set[str]:
    get_output = getattr(model, "get_output_embeddings", None)
    output = get_output() if callable(get_output) else None
    heads = [output] if output is not None else [getattr(model, n, None) for n in _HEAD_NAMES]
    wanted = {id(h) for h in heads if isinstance(h, nn.Module)}
    return {name for name, module in model.named_modules() if id(module) in wanted}
