"""FP8 training for ``nn.Linear`` layers through torchao (the ``fp8`` extra)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

FP8_RECIPES = ("tensorwise", "rowwise", "rowwise_with_gw_hp")


def convert_to_float8(
    model: nn.Module,
    *,
    filter_fqns: Sequence[str] = (),
    min_features: int = 1024,
    recipe: str = "tensorwise",
) -> nn.Module:
    """Returns ``model`` with its eligible ``nn.Linear`` layers swapped in place for torchao's
    ``Float8Linear`` (FP8 matmuls in forward and backward, on GPUs of compute capability 8.9+).

    A linear is left in high precision when its name contains one of ``filter_fqns`` (e.g.
    ``"lm_head"``, ``"router"``), when ``in_features`` or ``out_features`` is below
    ``min_features`` (the scaling work costs more than the FP8 matmul saves on small layers), or
    when either is not a multiple of 16 (``torch._scaled_mm`` needs it).

    Args:
        model: any module; converted in place.
        filter_fqns: substrings of module names to keep in high precision.
        min_features: the smallest ``in_features`` and ``out_features`` worth converting.
        recipe: torchao's scaling recipe: ``"tensorwise"``, ``"rowwise"`` or
            ``"rowwise_with_gw_hp"``.

    Raises:
        ImportError: torchao is not installed (install the ``automodel-kernels[fp8]`` extra).
        ValueError: ``recipe`` is unknown.

    Example:
        >>> model = nn.Sequential(nn.Linear(2048, 2048), nn.Linear(2048, 8))
        >>> convert_to_float8(model)  # doctest: +SKIP
    """
    if recipe not in FP8_RECIPES:
        raise ValueError(f"convert_to_float8: recipe={recipe!r}; expected one of {FP8_RECIPES}")
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as err:
        raise ImportError(
            "convert_to_float8 needs torchao: pip install 'automodel-kernels[fp8]' (or torchao "
            "directly), or train without fp8"
        ) from err
    config = Float8LinearConfig.from_recipe_name(recipe)
    return convert_to_float8_training(
        model,
        config=config,
        module_filter_fn=_float8_module_filter(filter_fqns=filter_fqns, min_features=min_features),
    )


def _float8_module_filter(
    *, filter_fqns: Sequence[str] = (), min_features: int = 1024
) -> Callable[[nn.Module, str], bool]:
    """Returns torchao's ``module_filter_fn``: True for the linears :func:`convert_to_float8` converts.

    Example:
        >>> keep = _float8_module_filter(filter_fqns=("lm_head",), min_features=64)
        >>> keep(nn.Linear(64, 128), "layers.0.mlp.up_proj"), keep(nn.Linear(64, 128), "lm_head")
        (True, False)
    """
    names = tuple(filter_fqns)

    def module_filter_fn(module: nn.Module, fqn: str) -> bool:
        if not isinstance(module, nn.Linear):
            return False
        if any(name in fqn for name in names):
            return False
        dims = (module.in_features, module.out_features)
        return all(d >= min_features and d % 16 == 0 for d in dims)

    return module_filter_fn
