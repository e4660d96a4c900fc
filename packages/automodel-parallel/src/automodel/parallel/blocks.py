"""``find_blocks``: the repeated blocks (decoder layers) of a model, found by structure."""

from __future__ import annotations

from torch import nn


def _has_params(module: nn.Module) -> bool:
    return any(True for _ in module.parameters())


def find_blocks(
    model: nn.Module, names: str | list[str] | None = None
) -> list[tuple[str, nn.Module]]:
    """Returns ``(fqn, block)`` for every repeated block of ``model``, in forward order.

    A block list is an ``nn.ModuleList`` (or ``nn.ModuleDict``, as in pipeline stages) whose
    children share one class and hold parameters (``model.layers`` of a Hugging Face decoder, a
    vision tower's ``encoder.layers``...). Lists nested inside a found block (e.g. per-expert
    lists) are part of that block, not blocks.

    Args:
        model: any module.
        names: FQN(s) of the block lists to use instead of searching, e.g. ``"model.layers"``.

    Returns:
        The blocks with their FQNs, outer lists in ``named_modules`` order.

    Raises:
        ValueError: if a name in ``names`` is not an ``nn.ModuleList`` of ``model``.

    Example:
        >>> [fqn for fqn, _ in find_blocks(hf_llama)]
        ['model.layers.0', 'model.layers.1']
    """
    lists: list[tuple[str, nn.Module]] = []
    if names is not None:
        for name in [names] if isinstance(names, str) else names:
            try:
                found = model.get_submodule(name)
            except AttributeError:
                found = None
            if not isinstance(found, nn.ModuleList | nn.ModuleDict):
                raise ValueError(
                    f"blocks={name!r} is not an nn.ModuleList (or ModuleDict) of {type(model).__name__}; pass the "
                    "FQN of the repeated layer list, e.g. 'model.layers'"
                )
            lists.append((name, found))
    else:
        taken: list[str] = []
        for fqn, module in model.named_modules():
            if not isinstance(module, nn.ModuleList | nn.ModuleDict) or len(module) == 0:
                continue
            if any(fqn.startswith(prefix + ".") for prefix in taken):
                continue
            children = list(module.children())
            if len({type(c) for c in children}) == 1 and all(_has_params(c) for c in children):
                lists.append((fqn, module))
                taken.append(fqn)
    return [
        (f"{fqn}.{key}", block) for fqn, blocks in lists for key, block in blocks.named_children()
    ]
