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
    ``nn.Linear`` is an error (peft raises too), as is matching nothing.

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
    if not found:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        leaf_names = sorted({n.rsplit(".", 1)[-1] for n in linears})
        raise ValueError(
            f"target_modules={config.target_modules!r} (exclude_modules="
            f"{config.exclude_modules!r}) matches no linear layer of {type(model).__name__}; "
            f"its linear layers are named {leaf_names[:20]}"
        )
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
