"""The layering holds in the source, and the checker demonstrably catches violations."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from harness.layering import PACKAGES, find_namespace_inits, find_violations

ROOT = Path(__file__).resolve().parents[2]
PACKAGES_DIR = ROOT / "packages"


def test_every_package_exists_with_public_init():
    for pkg in PACKAGES:
        init = PACKAGES_DIR / f"automodel-{pkg}" / "src" / "automodel" / pkg / "__init__.py"
        assert init.is_file(), init
        assert "__all__" in init.read_text(), f"{init} must define __all__"
        assert (init.parent / "py.typed").is_file()


def test_source_respects_layering():
    assert find_violations(PACKAGES_DIR) == []


def test_automodel_is_a_namespace_package():
    assert find_namespace_inits(PACKAGES_DIR) == []


@pytest.mark.parametrize(
    ("pkg", "source", "expected"),
    [
        ("parallel", "import transformers\n", "automodel.parallel must not import transformers"),
        (
            "ckpt",
            "from transformers.modeling_utils import PreTrainedModel\n",
            "must not import transformers.modeling_utils",
        ),
        (
            "kernels",
            "from automodel.parallel import parallelize\n",
            "automodel.kernels must not import automodel.parallel",
        ),
        ("ckpt", "from .. import core\n", "automodel.ckpt must not import automodel.core"),
        (
            "core",
            "def f():\n    import automodel.recipes.cli\n",
            "automodel.core must not import automodel.recipes.cli",
        ),
        (
            "parallel",
            "from automodel import ckpt\n",
            "automodel.parallel must not import automodel.ckpt",
        ),
    ],
)
def test_checker_catches_planted_violation(tmp_path, pkg, source, expected):
    copy = tmp_path / "packages"
    shutil.copytree(PACKAGES_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / f"automodel-{pkg}" / "src" / "automodel" / pkg / "_planted.py").write_text(source)
    violations = find_violations(copy)
    assert len(violations) >= 1
    assert any(expected in v and "_planted.py" in v for v in violations), violations


def test_checker_catches_namespace_init(tmp_path):
    copy = tmp_path / "packages"
    shutil.copytree(PACKAGES_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "automodel-ckpt" / "src" / "automodel" / "__init__.py").write_text("")
    assert len(find_namespace_inits(copy)) == 1


def test_allowed_imports_are_not_flagged(tmp_path):
    copy = tmp_path / "packages"
    shutil.copytree(PACKAGES_DIR, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "automodel-core" / "src" / "automodel" / "core" / "_ok.py").write_text(
        "import transformers\nfrom automodel.parallel import ParallelConfig\nfrom automodel import ckpt\n"
    )
    (copy / "automodel-parallel" / "src" / "automodel" / "parallel" / "_ok.py").write_text(
        "import torch\nfrom . import x\nfrom .mesh import build_mesh\n"
    )
    assert find_violations(copy) == []
