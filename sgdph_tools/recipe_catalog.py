"""The recipes that ship with the package: where they are, what each trains, and recipe names.

The repository's top-level ``recipes/`` folder is installed as the package ``sgdph_tools.recipes``
(pyproject.toml maps it), so a wheel and a source checkout see the same files. A recipe's name is its
file name without ``.yaml`` (names are unique across the sub-folders).
"""

from __future__ import annotations

import difflib
import importlib.resources
from dataclasses import dataclass
from pathlib import Path

import yaml

from .errors import UserError
from .io import atomic_write_text


def recipes_root() -> Path:
    """The folder holding the packaged recipes (installed, editable or source checkout alike)."""
    try:
        root = importlib.resources.files("sgdph_tools.recipes")
    except ModuleNotFoundError:  # run from a source tree that was never installed
        return Path(__file__).resolve().parent.parent / "recipes"
    return Path(str(root))


def packaged_recipes() -> dict[str, Path]:
    """Recipe name -> file, sorted by path."""
    root = recipes_root()
    return {p.stem: p for p in sorted(root.rglob("*.yaml"), key=lambda p: p.relative_to(root).as_posix())}


@dataclass(frozen=True)
class RecipeInfo:
    name: str
    path: Path
    model: str
    dataset: str
    optimizer: str
    reproduces: str  # "Table 1", or "-" for a recipe that reproduces no table of the paper


def describe(name: str, path: Path) -> RecipeInfo:
    text = path.read_text()
    data = yaml.safe_load(text) or {}
    comments = [line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")]
    table = next((c.split(":")[0] for c in comments if c.startswith("Table ")), "-")
    return RecipeInfo(
        name,
        path,
        (data.get("model") or {}).get("name", "?"),
        (data.get("data") or {}).get("name", "?"),
        (data.get("optimizer") or {}).get("name", "sgdph"),
        table,
    )


def catalog() -> list[RecipeInfo]:
    return [describe(name, path) for name, path in packaged_recipes().items()]


def _closest(name: str) -> str | None:
    close = difflib.get_close_matches(name, list(packaged_recipes()), n=1)
    return close[0] if close else None


def resolve_recipe(name_or_path: str | Path) -> Path:
    """A recipe argument: an existing file, else the name of a packaged recipe (``quickstart``)."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    is_name = len(path.parts) == 1 and path.suffix in ("", ".yaml")
    stem = path.name.removesuffix(".yaml")
    packaged = packaged_recipes()
    if is_name and stem in packaged:
        return packaged[stem]
    if stem in packaged:
        raise UserError(f"no such recipe file: {path}; the packaged recipe of that name runs with `sgdph train {stem}`")
    close = _closest(stem)
    suggestion = f"; did you mean the packaged recipe {close!r}?" if close else ""
    if not is_name:
        raise UserError(f"no such recipe file: {path}{suggestion}")
    hint = suggestion or "; `sgdph recipes list` shows the packaged ones"
    raise UserError(f"no recipe file or packaged recipe named {str(name_or_path)!r}{hint}")


def copy_recipe(name: str, dest: Path | None = None, *, force: bool = False) -> Path:
    """Write the packaged recipe ``name`` to ``dest`` (a file, or a folder to put ``NAME.yaml`` in;
    default: ``./NAME.yaml``). Refuses to overwrite unless ``force``."""
    source = packaged_recipes().get(name.removesuffix(".yaml"))
    if source is None:
        close = _closest(name)
        hint = f"; did you mean {close!r}?" if close else "; `sgdph recipes list` shows them"
        raise UserError(f"no packaged recipe named {name!r}{hint}")
    target = Path(dest) if dest is not None else Path(source.name)
    if target.is_dir():
        target = target / source.name
    if target.exists() and not force:
        raise UserError(f"{target} exists; choose another destination or pass --force to overwrite it")
    atomic_write_text(source.read_text(), target)  # through a link, onto a device; never replacing either
    return target
