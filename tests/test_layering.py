"""The package's dependency direction, checked from the source (every import, lazy ones included):

- foundations (errors, checks, io, distributed, cpu, records, version) import only foundations;
- curvature estimation imports only foundations and itself;
- nothing below the optimizer (curvature, tagging, models, data, surgery, recipes) imports the
  optimizer, the trainer, the CLI or the analysis modules; the optimizer imports no trainer, CLI,
  analysis, recipe, data or surgery; the trainer no CLI;
- the analysis modules (bench, exactness) import no private name of the package;
- no import circle between modules;
- no module over 500 lines.

The checker runs on a folder, so a test can show that it fails on a package that breaks a rule.
"""

from __future__ import annotations

import ast
from pathlib import Path

import sgdph_tools

PACKAGE = Path(sgdph_tools.__file__).parent
MAX_LINES = 500

FOUNDATIONS = ("errors", "checks", "io", "distributed", "cpu", "records", "version")
BELOW_OPTIMIZER = (*FOUNDATIONS, "curvature", "module_kinds", "tagging", "models", "data", "surgery", "paper")
BELOW_OPTIMIZER += ("recipe", "recipe_catalog")
UPPER = ("optim", "train", "cli", "bench", "exactness", "examples")
ANALYSIS = ("bench", "exactness")

#: (whose imports, the only areas they may import (None: any but the forbidden), areas they may not, why)
RULES = [
    (FOUNDATIONS, FOUNDATIONS, (), "foundations import only foundations"),
    (("curvature",), (*FOUNDATIONS, "curvature"), (), "curvature imports only foundations and itself"),
    (BELOW_OPTIMIZER, None, UPPER, "modules below the optimizer import no optimizer, trainer, CLI or analysis"),
    (("optim",), None, ("train", "cli", *ANALYSIS, "recipe", "data", "surgery"), "the optimizer stays a library"),
    (("train",), None, ("cli",), "the trainer does not import the CLI"),
]


def _module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)  # relative to the package: "" is the package itself


def _imports(path: Path, name: str, modules: set[str], package: str) -> list[tuple[str, str]]:
    """(imported module relative to the package, imported name) for every import of the package."""
    tree = ast.parse(path.read_text())
    is_package = path.name == "__init__.py"
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                top, _, rest = alias.name.partition(".")
                if top == package:
                    out.append((rest, ""))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if name else []
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                top, _, module = (node.module or "").partition(".")
                if top != package:
                    continue
            for alias in node.names:
                candidate = f"{module}.{alias.name}" if module else alias.name
                out.append((candidate, "") if candidate in modules else (module, alias.name))
    return out


def _area(module: str) -> str:
    return module.split(".")[0]


def violations(root: Path) -> list[str]:
    """Every broken rule in the package at ``root``, one line each."""
    files = {_module_name(p, root): p for p in root.rglob("*.py")}
    modules = set(files)
    found, edges = [], {m: set() for m in modules}
    for name, path in sorted(files.items()):
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES:
            found.append(f"{name or root.name}: {lines} lines (at most {MAX_LINES})")
        for target, imported in _imports(path, name, modules, root.name):
            if target == name:
                continue
            edges[name].add(target)
            for who, allowed, forbidden, why in RULES:
                if _area(name) not in who:
                    continue
                area = _area(target)
                bad = area not in allowed if allowed is not None else area in forbidden
                if target == "" or bad:  # the package itself pulls in everything
                    found.append(f"{name} imports {target or root.name}: {why}")
            if _area(name) in ANALYSIS and imported.startswith("_"):
                found.append(f"{name} imports the private name {target}.{imported}")
    found += [f"import circle: {' -> '.join(c)}" for c in _cycles(edges)]
    return found


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """One circle per strongly connected group of modules (Tarjan's algorithm)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in edges:
                continue
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group) + [sorted(group)[0]])

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def test_the_package_keeps_its_layers():
    assert violations(PACKAGE) == []


def _write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_check_fails_on_a_package_that_breaks_each_rule(tmp_path):
    pkg = _write(
        tmp_path / "pkg",
        {
            "__init__.py": "",
            "checks.py": "from .optim import SGDPH\n",  # a foundation importing the optimizer
            "curvature/__init__.py": "",
            "curvature/step.py": "def f():\n    from ..train import loop  # lazy imports count\n",
            "optim/__init__.py": "SGDPH = object\n",
            "optim/sgdph.py": "from ..recipe import Recipe\n",
            "recipe.py": "Recipe = 1\n",
            "train/__init__.py": "",
            "train/loop.py": "import pkg.cli\n",
            "cli/__init__.py": "",
            "bench.py": "from .optim.sgdph import _private\n",
            "tagging.py": "from . import models\n",
            "models.py": "from .tagging import x\n",
            "paper.py": "\n" * (MAX_LINES + 1),
        },
    )
    found = violations(pkg)
    expected = [
        "checks imports optim: foundations import only foundations",
        "curvature.step imports train.loop: curvature imports only foundations and itself",
        "optim.sgdph imports recipe: the optimizer stays a library",
        "train.loop imports cli: the trainer does not import the CLI",
        "bench imports the private name optim.sgdph._private",
        "import circle: models -> tagging -> models",
        f"paper: {MAX_LINES + 1} lines (at most {MAX_LINES})",
    ]
    for line in expected:
        assert line in found, (line, found)
