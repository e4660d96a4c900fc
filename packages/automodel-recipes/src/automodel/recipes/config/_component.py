"""`_target_` components: an import path plus keyword arguments checked against its signature."""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, model_validator


def import_target(path: str) -> Callable[..., Any]:
    """Returns the object named by a dotted import path like ``torch.optim.AdamW``.

    Raises:
        ValueError: the module or attribute does not exist.
    """
    module_name, _, attr = path.rpartition(".")
    if not module_name:
        raise ValueError(f"_target_ {path!r} must be a dotted import path like 'torch.optim.AdamW'")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError:
        # A nested attribute (module.Class.method): resolve the prefix as an attribute itself.
        if "." not in module_name:
            raise ValueError(f"_target_ {path!r}: cannot import module {module_name!r}") from None
        obj = import_target(module_name)
    if not hasattr(obj, attr):
        names = [n for n in dir(obj) if not n.startswith("_")]
        close = difflib.get_close_matches(attr, names, n=1)
        hint = f"; did you mean {module_name}.{close[0]}?" if close else ""
        raise ValueError(f"_target_ {path!r}: {module_name!r} has no attribute {attr!r}{hint}")
    return getattr(obj, attr)  # type: ignore[no-any-return]


def check_arguments(
    target: Callable[..., Any], path: str, kwargs: dict[str, Any], skip: tuple[str, ...] = ()
) -> None:
    """Raises ValueError when ``kwargs`` names an argument ``target`` does not accept.

    Arguments listed in ``skip`` are supplied at run time (e.g. ``params`` of an optimizer).
    """
    try:
        sig = inspect.signature(target)
    except (TypeError, ValueError):
        return  # builtins without a signature: nothing to check
    params = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL]
    for key in kwargs:
        if key not in accepted:
            close = difflib.get_close_matches(key, [a for a in accepted if a not in skip], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ValueError(
                f"unknown argument {key!r} for {path} (accepts: "
                f"{', '.join(a for a in accepted if a not in skip)}){hint}"
            )


class Component(BaseModel):
    """A `_target_` import path; every other key is a keyword argument for it, checked at load."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    target: str = Field(alias="_target_")
    _skip_params: ClassVar[tuple[str, ...]] = ()

    @property
    def kwargs(self) -> dict[str, Any]:
        """Returns the keyword arguments given beside `_target_`."""
        return dict(self.model_extra or {})

    @model_validator(mode="after")
    def _check_target(self) -> Component:
        check_arguments(import_target(self.target), self.target, self.kwargs, self._skip_params)
        return self

    def build(self, *args: Any, **runtime: Any) -> Any:
        """Returns ``target(*args, **kwargs, **runtime)``: config arguments plus run-time ones."""
        return import_target(self.target)(*args, **{**self.kwargs, **runtime})
