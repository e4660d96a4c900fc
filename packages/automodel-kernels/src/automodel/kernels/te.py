"""NVIDIA Transformer Engine backend (the ``te`` extra): TE's Linear and RMSNorm modules in place
of a model's own, its fused attention (``attention(..., backend="te")``), and FP8 through TE's
autocast.

Transformer Engine is imported only when one of these runs. Its import fails in three ways, each
caught and re-raised as an ``ImportError`` that says what is missing: ``ImportError`` (not
installed), ``OSError`` (a CUDA, cuBLAS or cuDNN library its wheel was built against is not on the
machine) and ``RuntimeError`` (its extension found no usable GPU or a mismatched torch).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any, cast

import torch
from torch import nn

from automodel.kernels.fp8 import _float8_module_filter

logger = logging.getLogger("automodel.kernels")

# FP8 scaling recipes of te_fp8_autocast: name -> class in transformer_engine.common.recipe.
TE_FP8_RECIPES = {
    "delayed": "DelayedScaling",
    "current": "Float8CurrentScaling",
    "mxfp8": "MXFP8BlockScaling",
}


def import_te() -> ModuleType:
    """Returns ``transformer_engine.pytorch``.

    Raises:
        ImportError: Transformer Engine is missing or cannot load; the message names the original
            error (``ModuleNotFoundError``, ``OSError`` for a missing CUDA library, ``RuntimeError``)
            and how to install it.
    """
    try:
        import transformer_engine.pytorch as te
    except (ImportError, OSError, RuntimeError) as err:
        raise ImportError(
            f"Transformer Engine cannot be used here ({type(err).__name__}: {err}). Install it on a "
            "CUDA machine with pip install 'automodel-kernels[te]'; an OSError means a CUDA, "
            "cuBLAS or cuDNN library its wheel needs is missing (install the transformer-engine "
            "build for this machine's CUDA major version). Or run without TE: the default "
            "backends need only torch"
        ) from err
    return te


def te_available() -> bool:
    """Returns True when :func:`import_te` succeeds."""
    try:
        import_te()
    except ImportError:
        return False
    return True


def te_conversion_plan(
    model: nn.Module,
    *,
    filter_fqns: Sequence[str] = (),
    min_features: int = 1024,
    rms_norms: Mapping[type[nn.Module], float] | None = None,
) -> list[tuple[str, str]]:
    """Returns ``[(module name, "linear" | "rms_norm"), ...]``: what :func:`convert_to_te` swaps.

    A linear is kept when its name contains one of ``filter_fqns``, a dimension is below
    ``min_features`` or not a multiple of 16 (FP8 GEMMs need it): the rules of
    :func:`automodel.kernels.convert_to_float8`. A norm is swapped when its class is a key of
    ``rms_norms``.

    Example:
        >>> model = nn.Sequential(nn.Linear(2048, 2048), nn.Linear(2048, 8))
        >>> te_conversion_plan(model)
        [('0', 'linear')]
    """
    keep_linear = _float8_module_filter(filter_fqns=filter_fqns, min_features=min_features)
    norm_types = tuple(rms_norms or {})
    plan = []
    for name, module in model.named_modules():
        if not name:
            continue  # the root cannot be swapped in place
        if isinstance(module, nn.Linear) and keep_linear(module, name):
            plan.append((name, "linear"))
        elif (
            norm_types
            and isinstance(module, norm_types)
            and not any(f in name for f in filter_fqns)
        ):
            plan.append((name, "rms_norm"))
    return plan


def convert_to_te(
    model: nn.Module,
    *,
    filter_fqns: Sequence[str] = (),
    min_features: int = 1024,
    rms_norms: Mapping[type[nn.Module], float] | None = None,
) -> nn.Module:
    """Returns ``model`` with its eligible layers swapped in place for Transformer Engine's.

    ``nn.Linear`` becomes ``transformer_engine.pytorch.Linear`` and every module whose class is a key
    of ``rms_norms`` becomes ``transformer_engine.pytorch.RMSNorm``, with the same weights, dtype and
    device. Run the model under :func:`te_fp8_autocast` to get FP8 GEMMs.

    Args:
        model: any module (its parameters on a CUDA device); converted in place.
        filter_fqns: substrings of module names to leave as they are (e.g. ``"lm_head"``).
        min_features: the smallest ``in_features`` and ``out_features`` worth converting.
        rms_norms: RMSNorm classes to swap, each with its weight offset: ``0.0`` for Llama's
            ``x_normed * weight``, ``1.0`` for Gemma's ``x_normed * (1 + weight)`` (TE's
            ``zero_centered_gamma``). The module must hold ``weight`` and ``variance_epsilon`` or
            ``eps``.

    Raises:
        ImportError: Transformer Engine cannot be imported (see :func:`import_te`).
        ValueError: an ``rms_norms`` offset other than 0 or 1, or a norm without an epsilon.

    Example:
        >>> from transformers.models.llama.modeling_llama import LlamaRMSNorm
        >>> convert_to_te(model, filter_fqns=("lm_head",), rms_norms={LlamaRMSNorm: 0.0})  # doctest: +SKIP
    """
    for cls, offset in (rms_norms or {}).items():
        if offset not in (0.0, 1.0):
            raise ValueError(
                f"convert_to_te: rms_norms[{cls.__name__}] = {offset}; expected 0.0 (x * weight) "
                "or 1.0 (x * (1 + weight), TE's zero_centered_gamma)"
            )
    plan = te_conversion_plan(
        model, filter_fqns=filter_fqns, min_features=min_features, rms_norms=rms_norms
    )
    te = import_te()
    for name, kind in plan:
        old = model.get_submodule(name)
        if kind == "linear":
            new = _te_linear(te, cast(nn.Linear, old))
        else:
            new = _te_rms_norm(te, old, (rms_norms or {})[_norm_class(old, rms_norms or {})])
        _set_submodule(model, name, new)
    logger.info(
        "automodel.kernels: convert_to_te swapped %d linears and %d RMSNorms for Transformer Engine's",
        sum(kind == "linear" for _, kind in plan),
        sum(kind == "rms_norm" for _, kind in plan),
    )
    return model


@contextlib.contextmanager
def te_fp8_autocast(
    enabled: bool = True, recipe: str = "delayed", **recipe_kwargs: Any
) -> Iterator[None]:
    """Runs the block's Transformer Engine modules with FP8 GEMMs (TE's ``autocast``, or
    ``fp8_autocast`` in releases without it).

    Args:
        enabled: False runs the block in the modules' own precision.
        recipe: ``"delayed"`` (per-tensor scales from an amax history), ``"current"`` (per-tensor
            scales from the current tensor) or ``"mxfp8"`` (block scales, Blackwell).
        recipe_kwargs: passed to the recipe's class (e.g. ``amax_history_len=16``).

    Raises:
        ImportError: Transformer Engine cannot be imported, or this version lacks the recipe.
        ValueError: ``recipe`` is unknown.
    """
    if recipe not in TE_FP8_RECIPES:
        raise ValueError(
            f"te_fp8_autocast: recipe={recipe!r}; expected one of {sorted(TE_FP8_RECIPES)}"
        )
    te = import_te()
    from transformer_engine.common import recipe as recipes

    cls = getattr(recipes, TE_FP8_RECIPES[recipe], None)
    if cls is None:
        raise ImportError(
            f"te_fp8_autocast: this Transformer Engine has no {TE_FP8_RECIPES[recipe]} "
            f"(recipe={recipe!r}); upgrade transformer-engine or use recipe='delayed'"
        )
    if hasattr(te, "autocast"):  # newer Transformer Engine: fp8_autocast is deprecated there
        context = te.autocast(enabled=enabled, recipe=cls(**recipe_kwargs))
    else:
        context = te.fp8_autocast(enabled=enabled, fp8_recipe=cls(**recipe_kwargs))
    with context:
        yield


def _te_linear(te: ModuleType, old: nn.Linear) -> nn.Module:
    """Returns TE's ``Linear`` holding ``old``'s weight and bias."""
    new = te.Linear(
        old.in_features,
        old.out_features,
        bias=old.bias is not None,
        params_dtype=old.weight.dtype,
        device=old.weight.device,
    )
    with torch.no_grad():
        new.weight.copy_(old.weight)
        if old.bias is not None:
            new.bias.copy_(old.bias)
    return new


def _te_rms_norm(te: ModuleType, old: nn.Module, offset: float) -> nn.Module:
    """Returns TE's ``RMSNorm`` with ``old``'s weight and epsilon."""
    eps = getattr(old, "variance_epsilon", getattr(old, "eps", None))
    if eps is None:
        raise ValueError(
            f"convert_to_te: {type(old).__name__} has neither variance_epsilon nor eps; an RMSNorm "
            "in rms_norms must hold its epsilon in one of them"
        )
    weight = old.get_parameter("weight")
    new = te.RMSNorm(
        weight.shape[0],
        eps=float(eps),
        zero_centered_gamma=offset == 1.0,
        params_dtype=weight.dtype,
        device=weight.device,
    )
    with torch.no_grad():
        new.weight.copy_(weight)
    return new


def _norm_class(module: nn.Module, rms_norms: Mapping[type[nn.Module], float]) -> type[nn.Module]:
    """Returns the key of ``rms_norms`` that ``module`` is an instance of."""
    return next(cls for cls in rms_norms if isinstance(module, cls))


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)
