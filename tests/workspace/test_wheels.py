"""Each leaf wheel installs alone, with only its declared dependencies, and imports (no transformers).

Builds every wheel with ``uv build --all-packages --no-sources`` (so sibling ranges, not workspace
paths, are what the wheels declare), then installs one leaf at a time into a fresh virtualenv.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
UV = shutil.which("uv")

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(UV is None, reason="needs the `uv` executable on PATH"),
]

LEAVES = {
    "automodel-ckpt": "automodel.ckpt",
    "automodel-parallel": "automodel.parallel",
    "automodel-kernels": "automodel.kernels",
}


def _run(*args: str | Path, cwd: Path = ROOT) -> str:
    proc = subprocess.run(
        [str(a) for a in args], cwd=cwd, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, (
        f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    )
    return proc.stdout


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    _run(UV, "build", "--all-packages", "--no-sources", "--wheel", "-o", out)  # type: ignore[arg-type]
    found = {}
    for whl in out.glob("*.whl"):
        dist = whl.name.split("-")[0].replace("_", "-")
        found[dist] = whl
    assert set(found) == {
        "automodel-kernels",
        "automodel-parallel",
        "automodel-ckpt",
        "automodel-core",
        "automodel-recipes",
    }
    return found


def test_wheels_are_namespace_clean(wheels):
    for dist, whl in wheels.items():
        names = zipfile.ZipFile(whl).namelist()
        assert "automodel/__init__.py" not in names, f"{whl.name} ships automodel/__init__.py"
        pkg = dist.removeprefix("automodel-")
        assert f"automodel/{pkg}/__init__.py" in names
        assert f"automodel/{pkg}/py.typed" in names
        assert not [
            n for n in names if n.startswith("automodel/") and not n.startswith(f"automodel/{pkg}/")
        ]


@pytest.mark.parametrize("dist", sorted(LEAVES))
def test_leaf_installs_and_imports_alone(wheels, tmp_path, dist):
    venv = tmp_path / "venv"
    _run(UV, "venv", "-q", "--seed", "--python", "3.11", venv)  # type: ignore[arg-type]
    python = venv / "bin" / "python"
    _run(UV, "pip", "install", "-q", "--python", python, wheels[dist])  # type: ignore[arg-type]
    module = LEAVES[dist]
    probe = (
        "import importlib, importlib.util, json, sys\n"
        f"m = importlib.import_module({module!r})\n"
        "print(json.dumps({'version': m.__version__, 'all': list(m.__all__),"
        " 'transformers': importlib.util.find_spec('transformers') is not None,"
        " 'siblings': sorted(n for n in ('kernels','parallel','ckpt','core','recipes')"
        " if importlib.util.find_spec('automodel.' + n) is not None)}))\n"
    )
    info = json.loads(_run(python, "-c", probe).strip().splitlines()[-1])
    assert info["version"] == "0.1.0"
    assert info["transformers"] is False, f"{dist} pulled in transformers"
    assert info["siblings"] == [module.split(".")[1]], (
        f"{dist} pulled in siblings: {info['siblings']}"
    )
    if dist == "automodel-ckpt":
        help_text = _run(venv / "bin" / "automodel-ckpt", "--help")
        assert "Usage" in help_text
