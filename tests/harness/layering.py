"""The one-direction layering rule of the workspace, checked from the source's imports.

    kernels, parallel, ckpt  ->  torch (and their own declared deps) only; never a sibling, core or recipes
    parallel, ckpt           ->  never transformers
    core                     ->  never recipes

Every ``import`` and ``from ... import`` (relative ones resolved against the module's package),
including those inside functions and ``TYPE_CHECKING`` blocks, counts.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGES = ("kernels", "parallel", "ckpt", "core", "recipes")

FORBIDDEN: dict[str, tuple[str, ...]] = {
    "kernels": ("automodel.parallel", "automodel.ckpt", "automodel.core", "automodel.recipes"),
    "parallel": (
        "automodel.kernels",
        "automodel.ckpt",
        "automodel.core",
        "automodel.recipes",
        "transformers",
    ),
    "ckpt": (
        "automodel.kernels",
        "automodel.parallel",
        "automodel.core",
        "automodel.recipes",
        "transformers",
    ),
    "core": ("automodel.recipes",),
    "recipes": (),
}


def _module_name(src_root: Path, file: Path) -> str:
    parts = list(file.relative_to(src_root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported_names(tree: ast.AST, module: str, is_package: bool) -> list[tuple[int, str]]:
    """Returns (line, absolute module name) for every import in ``tree``."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)] if node.level > 1 else base
                prefix = ".".join(base)
                target = f"{prefix}.{node.module}" if node.module else prefix
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from automodel import core` imports automodel.core
            found.extend((node.lineno, f"{target}.{alias.name}") for alias in node.names)
    return found


def _matches(name: str, banned: str) -> bool:
    return name == banned or name.startswith(banned + ".")


def find_violations(packages_dir: Path) -> list[str]:
    """Returns one line per forbidden import under ``packages_dir`` (empty when the layering holds)."""
    violations: list[str] = []
    for pkg in PACKAGES:
        src_root = packages_dir / f"automodel-{pkg}" / "src"
        if not src_root.is_dir():
            continue
        for file in sorted(src_root.rglob("*.py")):
            module = _module_name(src_root, file)
            tree = ast.parse(file.read_text(), filename=str(file))
            for line, name in _imported_names(tree, module, file.name == "__init__.py"):
                for banned in FORBIDDEN[pkg]:
                    if _matches(name, banned):
                        rel = file.relative_to(packages_dir)
                        violations.append(f"{rel}:{line}: automodel.{pkg} must not import {name}")
    return sorted(set(violations))


def find_namespace_inits(packages_dir: Path) -> list[Path]:
    """Returns every ``automodel/__init__.py`` (forbidden: ``automodel`` is a PEP 420 namespace)."""
    return sorted(packages_dir.glob("automodel-*/src/automodel/__init__.py"))
