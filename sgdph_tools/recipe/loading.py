"""Reading recipes: YAML (with the number rule users expect), dotted ``key=value`` overrides, and the
whole path from a file to a validated :class:`~sgdph_tools.recipe.schema.Recipe`."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from .schema import APPLIES_TO, Recipe
from .validation import build, check_keys_apply, check_semantics, resolve_sgdph_choices


class _Loader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, except that numbers in exponent form without a dot (``1e-8``,
    ``5E-4``, ``1e6``) are numbers, as a user who writes them means, not strings; and a key given
    twice in one mapping is an error (PyYAML keeps the last one silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None,
                        None,
                        f"the key {key!r} is given twice (first at line {seen[key] + 1}); keep one",
                        key_node.start_mark,
                    )
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse recipe YAML (a file or an override's value) with the number rule above."""
    return yaml.load(text, Loader=_Loader)


def _set_dotted(data: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = data
    for key in keys[:-1]:
        if node.get(key) is None:
            node[key] = {}
        if not isinstance(node[key], dict):
            raise UserError(f"override '{dotted}': '{key}' is not a section")
        node = node[key]
    node[keys[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """``"optimizer.lr=0.05"`` -> ``("optimizer.lr", 0.05)``; the value is read as YAML."""
    if "=" not in text:
        raise UserError(f"override '{text}' must look like section.key=value (e.g. optimizer.lr=0.05)")
    key, raw = text.split("=", 1)
    try:
        value = load_yaml(raw) if raw.strip() else None
    except yaml.YAMLError as exc:
        raise UserError(f"override '{text}': the value is not valid YAML ({exc.problem})") from exc
    return key.strip(), value


#: Optimizers from a package outside the hard dependencies: name -> (module, the extra that installs it).


def _drop_settings_of_a_replaced_choice(data: dict, overridden: set[str]) -> None:
    """An override that changes a section's ``name`` (``optimizer.name=sgd`` on an SGD-PH recipe)
    replaces the file's choice: the file's keys for the old choice that the new one does not take go
    with it. Keys the overrides themselves set are kept (and checked)."""
    for section, rules in APPLIES_TO.items():
        written = data.get(section)
        if f"{section}.name" not in overridden or not isinstance(written, dict):
            continue
        for key, names in rules.items():
            if key in written and f"{section}.{key}" not in overridden and written.get("name") not in names:
                del written[key]


def _drop_kwargs_of_a_replaced_model(data: dict, file_model: str | None, overridden: set[str]) -> None:
    """``model.name=vit_tiny_patch16_224`` on a small_cnn recipe: the file's ``model.kwargs`` were the
    old architecture's constructor arguments (``width``, ``stages``), which the new one would refuse.
    They go; ``model.kwargs.*`` given as overrides stay."""
    model = data.get("model")
    if not isinstance(model, dict) or "model.name" not in overridden or model.get("name") == file_model:
        return
    if isinstance(model.get("kwargs"), dict):
        model["kwargs"] = {k: v for k, v in model["kwargs"].items() if f"model.kwargs.{k}" in overridden}


def _check_overrides(overrides: Any) -> list[str]:
    if isinstance(overrides, str):
        raise TypeError(
            f"overrides must be a list of 'section.key=value' strings, not one string: pass [{overrides!r}]"
        )
    overrides = list(overrides)
    for text in overrides:
        if not isinstance(text, str):
            raise TypeError(f"each override must be a 'section.key=value' string, got {type(text).__name__}")
    return overrides


def recipe_from_dict(data: dict, overrides: list[str] = ()) -> Recipe:
    if data is not None and not isinstance(data, dict):
        raise TypeError(f"data must be a dict of recipe sections (model, data, ...), got {type(data).__name__}")
    overrides = _check_overrides(overrides)
    data = copy.deepcopy(dict(data or {}))
    file_model = data.get("model", {}).get("name") if isinstance(data.get("model"), dict) else None
    overridden = set()
    for text in overrides:
        key, value = parse_override(text)
        _set_dotted(data, key, value)
        overridden.add(key)
    _drop_settings_of_a_replaced_choice(data, overridden)
    _drop_kwargs_of_a_replaced_model(data, file_model, overridden)
    recipe = build(data)
    check_keys_apply(data, recipe)
    check_semantics(recipe)
    resolve_sgdph_choices(recipe.optimizer)
    return recipe


def _written_keys(data: dict, overrides: list[str]) -> set[str]:
    """The dotted keys a recipe file and its overrides set explicitly."""
    keys = {f"{section}.{key}" for section, keys in data.items() if isinstance(keys, dict) for key in keys}
    return keys | {parse_override(text)[0] for text in overrides}


def load_recipe(path: str | Path, overrides: list[str] = ()) -> Recipe:
    """Read, override and validate a recipe file."""
    if not isinstance(path, (str, Path)):
        raise TypeError(f"path must be a recipe file's path, got {type(path).__name__}")
    overrides = _check_overrides(overrides)
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no such recipe file: {path}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path} is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at position {exc.start}): "
            "save the recipe as UTF-8"
        ) from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}") from None
    try:
        data = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise UserError(f"{path} is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from exc
    if data is not None and not isinstance(data, dict):
        raise UserError(f"{path} must hold a mapping with sections model, data, optimizer, schedule, trainer")
    recipe = recipe_from_dict(data or {}, overrides)
    written = _written_keys(data or {}, overrides)
    missing = [key for key in ("model.name", "data.name") if key not in written]
    if missing:
        raise UserError(
            f"{path} does not say what to train: set {' and '.join(missing)} (in the file or as overrides), "
            "or name a packaged recipe (sgdph recipes list)"
        )
    if recipe.trainer.name is None:
        recipe.trainer.name = f"{path.stem}-s{recipe.trainer.seed}"
    return recipe
