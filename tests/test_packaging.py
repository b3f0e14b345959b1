"""The wheel, built offline as a user's pip would: every package of the tree, the recipes as package
data, and an installed copy that finds and loads them on its own."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")  # build from a copy: the checkout gets no build/ or egg-info
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(REPO / name, src / name)
    for name in ("sgdph_tools", "recipes"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", str(src), "-w", str(out)],
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (built,) = out.glob("sgdph_tools-*.whl")
    return built


def test_the_wheel_holds_every_package_and_every_recipe(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {p.parent.relative_to(REPO).as_posix() for p in REPO.glob("sgdph_tools/**/__init__.py")}
    assert packages and all(f"{p}/__init__.py" in names for p in packages), "pyproject.toml's package list is stale"
    recipes = {p.relative_to(REPO / "recipes").as_posix() for p in REPO.glob("recipes/**/*.yaml")}
    assert recipes and {f"sgdph_tools/recipes/{r}" for r in recipes} <= names


def test_the_installed_wheel_finds_and_loads_its_recipes(wheel, tmp_path):
    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)  # what pip would install, without touching the environment
    probe = (
        "import sgdph_tools, sgdph_tools.recipe_catalog as c, sgdph_tools.recipe as r;"
        "names = c.packaged_recipes();"
        f"assert str(c.recipes_root()).startswith({str(site)!r}), c.recipes_root();"
        "[r.load_recipe(p) for p in names.values()];"
        "print(len(names), c.resolve_recipe('quickstart'))"
    )
    result = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    count, quickstart = result.stdout.split()
    assert int(count) == len(list(REPO.glob("recipes/**/*.yaml")))
    assert quickstart == str(site / "sgdph_tools" / "recipes" / "quickstart.yaml")
