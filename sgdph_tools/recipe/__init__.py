"""Recipes: typed YAML files that say what to train, on what, with which optimizer and schedule.

A recipe has five sections -- ``model``, ``data``, ``optimizer``, ``schedule``, ``trainer`` -- each a
dataclass of :mod:`.schema`, whose fields (with their defaults) are the complete list of keys.
:func:`load_recipe` (:mod:`.loading`) reads a file, applies dotted ``key=value`` overrides and
validates everything (:mod:`.validation`) before anything is built: an unknown key names the key and
the closest valid one, a wrong type names the key and the expected type, an unknown choice lists the
valid ones. ``docs/training.md`` documents every key.
"""

from .loading import load_recipe, load_yaml, parse_override, recipe_from_dict
from .schema import (
    APPLIES_TO,
    RAN_WITH_BEFORE,
    ConversionCfg,
    DataCfg,
    ModelCfg,
    OptimizerCfg,
    Recipe,
    ScheduleCfg,
    TrainerCfg,
    applicable_settings,
    with_defaults,
)
from .validation import THIRD_PARTY_OPTIMIZERS, resolve_sgdph_choices

__all__ = [
    "APPLIES_TO",
    "RAN_WITH_BEFORE",
    "THIRD_PARTY_OPTIMIZERS",
    "ConversionCfg",
    "DataCfg",
    "ModelCfg",
    "OptimizerCfg",
    "Recipe",
    "ScheduleCfg",
    "TrainerCfg",
    "applicable_settings",
    "load_recipe",
    "load_yaml",
    "parse_override",
    "recipe_from_dict",
    "resolve_sgdph_choices",
    "with_defaults",
]
