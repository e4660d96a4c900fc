"""Skips transformers' packed-sequence check when the model makes its own positions (no sync).

transformers' ``create_causal_mask`` (and the sliding-window variant) look for packed sequences
in ``position_ids`` whenever there is no attention mask and no cache. The check ends in a Python
``.all()`` on a device tensor: one host-device sync at the start of every training forward, so
the host cannot queue the forward while the GPU still runs the previous optimizer step (measured
on the Qwen3-MoE benchmark: ~6% of the step's tokens/s). When the caller passed none of
``position_ids``, ``attention_mask`` and a cache, the model builds ``arange`` positions itself,
which are never packed: the answer is known, so the mask functions are called without
``position_ids`` and build the same mask. Callers that pass ``position_ids`` keep the check.
"""

from __future__ import annotations

import contextvars
import inspect
import sys
from typing import Any

from torch import nn

_MASK_FUNCTIONS = ("create_causal_mask", "create_sliding_window_causal_mask")
_CACHE_NAMES = ("cache", "past_key_values")  # transformers >= 5.24 / before
_OWN_POSITIONS = contextvars.ContextVar("automodel_own_positions", default=False)


def skip_packed_check_for_own_positions(model: nn.Module) -> list[str]:
    """Returns the mask functions wrapped (``module.function`` names; empty when none apply).

    Hooks the decoder (``model.get_decoder()``) so that, during a forward whose caller passed
    no ``position_ids``, ``attention_mask`` or cache, its modeling file's mask functions receive
    ``position_ids=None``. The wrappers are module-wide but inert outside such a forward, so other
    models of the same family are unaffected. Calling it twice on a model is harmless.
    """
    get_decoder = getattr(model, "get_decoder", None)
    base = get_decoder() if callable(get_decoder) else model
    if not isinstance(base, nn.Module) or getattr(base, "_automodel_own_positions", False):
        return []
    modeling = sys.modules.get(type(base).__module__)
    if modeling is None or not any(hasattr(modeling, n) for n in _MASK_FUNCTIONS):
        return []
    signature = inspect.signature(base.forward)
    caches = [name for name in _CACHE_NAMES if name in signature.parameters]
    checked = ("position_ids", "attention_mask", *caches)
    if not caches or not all(name in signature.parameters for name in checked):
        return []

    def enter(module: nn.Module, args: Any, kwargs: Any) -> None:
        try:
            given = signature.bind_partial(*args, **kwargs).arguments
        except TypeError:  # a call the signature does not describe: keep transformers' check
            given = dict.fromkeys(checked, True)
        own = all(given.get(name) is None for name in checked)
        module._automodel_own_positions_token = _OWN_POSITIONS.set(own)  # type: ignore[assignment]

    def leave(module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        _OWN_POSITIONS.reset(module._automodel_own_positions_token)  # type: ignore[arg-type]

    base.register_forward_pre_hook(enter, with_kwargs=True)
    base.register_forward_hook(leave, with_kwargs=True, always_call=True)  # errors too
    base._automodel_own_positions = True  # type: ignore[assignment]
    wrapped = []
    for name in _MASK_FUNCTIONS:
        original = getattr(modeling, name, None)
        if original is None:
            continue
        if not getattr(original, "_automodel_own_positions", False):
            setattr(modeling, name, _without_own_positions(original))
        wrapped.append(f"{modeling.__name__.rsplit('.', 1)[-1]}.{name}")
    return wrapped


def _without_own_positions(original: Any) -> Any:
    """Returns ``original`` called with ``position_ids=None`` inside a hooked own-positions forward."""

    def mask_function(*args: Any, **kwargs: Any) -> Any:
        if _OWN_POSITIONS.get():
            kwargs["position_ids"] = None
        return original(*args, **kwargs)

    mask_function._automodel_own_positions = True  # type: ignore[attr-defined]
    mask_function.__wrapped__ = original  # type: ignore[attr-defined]
    return mask_function
