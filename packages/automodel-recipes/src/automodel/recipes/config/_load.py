"""Reads a recipe YAML: `${VAR}` interpolation, dotted overrides, validation with did-you-mean errors."""

from __future__ import annotations

import difflib
import os
import re
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from automodel.recipes._bundled import BUNDLED_DIR
from automodel.recipes.config._sections import RecipeConfig

# Innermost first: a default may itself hold ${OTHER}, substituted on an earlier pass.
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^${}]*))?\}")


class _Loader(yaml.SafeLoader):
    """YAML 1.1 safe loader that also reads ``1e-4`` (no dot) as a float, as users expect."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def parse_yaml(text: str) -> Any:
    """Returns the value of a YAML document (safe loader; ``3e-4`` is a float)."""
    return yaml.load(text, Loader=_Loader)


class ConfigError(ValueError):
    """A recipe file or override is invalid; the message lists every problem, one per line."""


def builtin_variables() -> dict[str, str]:
    """Returns the variables every config may use besides the environment.

    ``AUTOMODEL_BUNDLED`` is the folder of bundled data and models; ``AUTOMODEL_RUN_ID`` a
    timestamp fixed once per launch (the launcher exports it so every rank sees the same value).
    """
    run_id = os.environ.setdefault("AUTOMODEL_RUN_ID", time.strftime("%Y%m%d-%H%M%S"))
    return {"AUTOMODEL_BUNDLED": str(BUNDLED_DIR), "AUTOMODEL_RUN_ID": run_id}


def interpolate(value: Any, where: str = "") -> Any:
    """Returns ``value`` with every ``${VAR}`` / ``${VAR:-default}`` in its strings substituted.

    Raises:
        ConfigError: a variable is unset and has no default.
    """
    if isinstance(value, str):
        env = {**builtin_variables(), **os.environ}

        def sub(m: re.Match[str]) -> str:
            name, default = m.group(1), m.group(2)
            if name in env:
                return env[name]
            if default is not None:
                return default
            raise ConfigError(
                f"{where or 'config'}: environment variable ${{{name}}} is not set; export it "
                f"or write ${{{name}:-default}}"
            )

        while True:
            new = _VAR.sub(sub, value)
            if new == value:
                return new
            value = new
    if isinstance(value, Mapping):
        return {k: interpolate(v, f"{where}.{k}" if where else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, f"{where}[{i}]") for i, v in enumerate(value)]
    return value


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Returns ``raw`` with each ``a.b.c=value`` override set (value parsed as YAML).

    Raises:
        ConfigError: an override is not of the form ``key.path=value``.
    """
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(
                f"override {item!r}: expected section.key=value, e.g. training.max_steps=100"
            )
        value = parse_yaml(text) if text else ""
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = value
    return raw


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Returns the mapping stored in a YAML file.

    Raises:
        ConfigError: the file is missing, unreadable, not YAML, or not a mapping.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {str(path)!r} does not exist") from None
    except OSError as e:
        raise ConfigError(f"config file {str(path)!r} cannot be read: {e.strerror}") from None
    try:
        data = parse_yaml(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{at}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def load_config(
    source: str | Path | Mapping[str, Any], overrides: Sequence[str] = ()
) -> RecipeConfig:
    """Returns the validated recipe config from a YAML path (or a dict) plus dotted overrides.

    Args:
        source: YAML file path, or an already-parsed mapping.
        overrides: ``section.key=value`` strings applied after reading, before interpolation.

    Returns:
        The typed :class:`RecipeConfig`.

    Raises:
        ConfigError: one line per problem, with where it is and a did-you-mean suggestion.

    Example:
        >>> cfg = load_config("examples/llama3_2_1b_sft.yaml", ["training.max_steps=10"])
    """
    raw = dict(source) if isinstance(source, Mapping) else read_yaml(source)
    raw = interpolate(apply_overrides(raw, overrides))
    try:
        return RecipeConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError("\n".join(_explain(err) for err in e.errors())) from None


def _fields_at(loc: tuple[Any, ...]) -> list[str]:
    """Returns the valid keys of the section located at ``loc`` (an error's path minus its key)."""
    model: type[BaseModel] | None = RecipeConfig
    for part in loc:
        if model is None or not isinstance(part, str) or part not in model.model_fields:
            return []
        annotation = model.model_fields[part].annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next(
            (c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None
        )
    if model is None:
        return []
    return [f.alias or name for name, f in model.model_fields.items()]


def _explain(err: Mapping[str, Any]) -> str:
    """Returns one line for one pydantic error: where, what is wrong, and the likely fix."""
    loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    where = ".".join(str(p) for p in loc) or "config"
    kind = err["type"]
    if kind == "extra_forbidden":
        parent, key = loc[:-1], str(loc[-1])
        valid = _fields_at(parent)
        close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        section = ".".join(str(p) for p in parent) or "top level"
        hint = f"; did you mean {close[0]!r}?" if close else f" (valid: {', '.join(valid)})"
        return f"{where}: unknown key {key!r} in {section}{hint}"
    if kind == "missing":
        return f"{where}: required key is missing"
    msg = str(err["msg"]).removeprefix("Value error, ")
    if kind.endswith("_type") or kind.endswith("_parsing") or kind == "literal_error":
        return f"{where}: {msg[0].lower() + msg[1:]}, got {err.get('input')!r}"
    return f"{where}: {msg}"
