"""Recipes: typed YAML files that say what to train, on what, with which optimizer and schedule.

A recipe has five sections -- ``model``, ``data``, ``optimizer``, ``schedule``, ``trainer`` -- each a
dataclass below, whose fields (with their defaults) are the complete list of keys. ``load_recipe``
reads a file, applies dotted ``key=value`` overrides and validates everything before anything is
built: an unknown key names the key and the closest valid one, a wrong type names the key and the
expected type, an unknown choice lists the valid ones. ``docs/training.md`` documents every key.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import UserError, did_you_mean


@dataclass
class ConversionCfg:
    wn: bool = False  # decouple every conv/linear that feeds no norm (sgdph convert --wn)
    strip_norm: bool = False  # replace every norm layer by an identity first
    exclude: list[str] = field(default_factory=list)  # fnmatch patterns of layers to leave alone
    add_bias: bool | None = None  # bias for decoupled layers that have none; null: only with strip_norm


@dataclass
class ModelCfg:
    name: str = "small_cnn"  # timm name, this project's models, or torchvision:NAME
    kwargs: dict[str, Any] = field(default_factory=dict)  # constructor kwargs (drop_rate, ...)
    conversion: ConversionCfg = field(default_factory=ConversionCfg)


@dataclass
class DataCfg:
    name: Literal["digits", "shapes", "cifar10", "cifar100", "imagefolder", "synthetic"] = "digits"
    root: str | None = None  # dataset folder (cifar*, imagefolder)
    download: bool = False  # cifar*: download into root when missing (needs internet)
    img_size: int | None = None  # default: digits 8, cifar 32, imagefolder 224, synthetic 32
    num_workers: int = 2  # DataLoader worker processes (0: load in the main process)
    train_dir: str = "train"  # imagefolder: sub-folders of root
    val_dir: str = "val"
    augment: bool = True  # the dataset's standard training augmentation
    val_fraction: float = 0.1  # held out of the training data, stratified, fixed; 0: no validation set
    num_classes: int = 10  # synthetic only (the others know theirs)
    channels: int = 3  # synthetic only
    num_train: int | None = None  # shapes (default 20000), synthetic (512): generated training images
    num_test: int | None = None  # shapes (default 2000), synthetic (128): generated test images


@dataclass
class OptimizerCfg:
    name: Literal["sgdph", "sgd", "adam", "adamw", "adabelief", "adahessian", "apollo"] = "sgdph"
    lr: float = 0.01
    weight_decay: float = 0.0
    # of the 1-D parameters (biases, norm gains, WN gammas); null: weight_decay (the paper's runs);
    # 0: none, as timm's factory does by default (filter_bias_and_bn)
    weight_decay_1d: float | None = None
    momentum: float = 0.9  # sgdph, sgd
    betas: list[float] | None = None  # adam, adamw, adabelief, adahessian (None: their default)
    eps: float | None = None  # None: the optimizer's default (sgdph: per rule, 0.3 normalized, 1e-4 paper; adam 1e-8)
    # SGD-PH only:
    so_lr: float = 1e-3
    hessian_momentum: float = 0.9
    # gnb (with gnb_fraction 0.25) since the study of docs/evidence.md; the paper's: rowsum
    estimator: Literal["rowsum", "hutchinson", "diagonal", "gnb"] = "gnb"
    engine: Literal["autograd", "finite_difference", "gauss_newton"] = "autograd"
    hessian_every: int = 1
    # estimator=gnb: its own forward on this fraction of the batch (null: the step's logits); other estimators: null
    gnb_fraction: float | None = 0.25
    authors_code: bool = False  # the authors' released update rule, step for step (docs/algorithm.md)
    # how the curvature scales the step; normalized since the study of docs/evidence.md (paper: Algorithm 1)
    rule: Literal["paper", "damped", "normalized"] = "normalized"
    second_order_kinds: list[str] | None = None  # None: every channel-wise 1-D kind
    kwargs: dict[str, Any] = field(default_factory=dict)  # anything else the optimizer takes


@dataclass
class ScheduleCfg:
    name: Literal["multistep", "cosine", "constant"] = "multistep"
    milestones: list[int] = field(default_factory=lambda: [60, 120, 180])  # multistep: epochs
    gamma: float = 0.1  # multistep: factor at each milestone
    min_lr: float = 0.0  # cosine: final learning rate
    warmup_epochs: float = 0.0  # linear warmup from warmup_factor·lr, per iteration
    warmup_factor: float = 0.1


@dataclass
class TrainerCfg:
    epochs: int = 200
    batch_size: int = 128  # global: split across processes
    eval_batch_size: int | None = None  # default: 2 x batch_size
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: CUDA when present
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # bf16: autocast; fp16: autocast + GradScaler
    seed: int = 0
    output_dir: str = "runs"
    name: str | None = None  # run folder name; default: the recipe's file name and the seed
    channels_last: bool = False
    compile: bool = False  # torch.compile the model (not with double backward)
    grad_clip: float | None = None  # max gradient norm
    threads: int | None = None  # CPU threads per process; null: the usable CPUs split over this machine's processes
    divergence_factor: float | None = 10.0  # stop when the loss stays above this x its start (null: off)
    divergence_patience: int = 3  # ... for this many progress checks (log_every iterations each) in a row
    log_every: int = 10  # progress refresh, iterations
    progress: bool = True  # a live progress bar when attached to a terminal


@dataclass
class Recipe:
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    optimizer: OptimizerCfg = field(default_factory=OptimizerCfg)
    schedule: ScheduleCfg = field(default_factory=ScheduleCfg)
    trainer: TrainerCfg = field(default_factory=TrainerCfg)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self, applicable_only: bool = False) -> str:
        """Every key (what a run records); ``applicable_only``: without the keys the chosen
        optimizer, schedule and dataset do not use (what ``--dry-run`` shows)."""
        data = applicable_settings(self.as_dict()) if applicable_only else self.as_dict()
        return yaml.safe_dump(data, sort_keys=False)


def applicable_settings(data: dict[str, Any]) -> dict[str, Any]:
    """A resolved recipe (as a dict) without the keys its choices do not use (``APPLIES_TO``; and
    ``gnb_fraction`` unless the estimator is gnb): what makes two runs the same experiment, whatever
    the defaults of unused keys were when each was recorded."""
    data = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for section, rules in APPLIES_TO.items():
        if not isinstance(data.get(section), dict):
            continue
        name = data[section].get("name")
        for key, names in rules.items():
            if name not in names:
                data[section].pop(key, None)
    optimizer = data.get("optimizer")
    if isinstance(optimizer, dict) and optimizer.get("estimator", "gnb") != "gnb":
        optimizer.pop("gnb_fraction", None)
    return data


#: Keys whose default changed after they were introduced, with the value a recorded recipe that predates
#: the key ran with (``optimizer.rule`` came with the paper's rule as its default; it is ``normalized`` since
#: the study). ``with_defaults`` fills these in instead of today's default.
RAN_WITH_BEFORE = {"optimizer": {"rule": "paper", "estimator": "rowsum", "gnb_fraction": None}}


def with_defaults(recorded: dict[str, Any], defaults: dict[str, Any] | None = None) -> dict[str, Any]:
    """A recorded recipe (a run's ``recipe.yaml``, a sweep's ``base.yaml``) with the keys it
    predates filled in with the behaviour it ran with -- today's defaults, except for the keys whose
    default has changed since (``RAN_WITH_BEFORE``) -- so that it compares equal to a newer recipe of
    the same settings. Recorded keys are kept as they are."""
    if defaults is None:
        defaults = Recipe().as_dict()
        for section, keys in RAN_WITH_BEFORE.items():
            chosen = recorded.get(section, {}).get("name") if isinstance(recorded.get(section), dict) else None
            for key, value in keys.items():  # only where the key applies (a recorded SGDM run has no rule)
                if chosen in APPLIES_TO.get(section, {}).get(key, (chosen,)):
                    defaults[section][key] = value
    merged = dict(defaults)
    for key, value in recorded.items():
        if isinstance(value, dict) and isinstance(defaults.get(key), dict) and defaults[key]:
            merged[key] = with_defaults(value, defaults[key])
        else:
            merged[key] = value
    return merged


# ----------------------------------------------------------------------------- reading YAML


class _Loader(yaml.SafeLoader):
    """YAML 1.1 as PyYAML reads it, except that numbers in exponent form without a dot (``1e-8``,
    ``5E-4``, ``1e6``) are numbers, as a user who writes them means, not strings."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse recipe YAML (a file or an override's value) with the number rule above."""
    return yaml.load(text, Loader=_Loader)


# ----------------------------------------------------------------------------- validation


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        names = " or ".join(_type_name(a) for a in args)
        return f"{names} or null" if len(args) < len(typing.get_args(tp)) else names
    if origin is list:
        (inner,) = typing.get_args(tp)
        return f"a list of {_type_name(inner)}"
    if origin is dict:
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(
        tp, getattr(tp, "__name__", str(tp))
    )


def _convert(value: Any, tp, key: str) -> Any:
    """``value`` checked (and, for int -> float, converted) against the annotation ``tp``."""
    origin = typing.get_origin(tp)
    wrong = UserError(f"recipe key '{key}' must be {_type_name(tp)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key)
    if origin is Literal:
        if value not in typing.get_args(tp):
            raise UserError(
                f"recipe key '{key}' must be {_type_name(tp)}, got {value!r}"
                f"{did_you_mean(str(value), map(str, typing.get_args(tp)))}"
            )
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, key)
            except UserError:
                continue
        raise wrong
    if origin is list:
        if not isinstance(value, list):
            raise wrong
        (inner,) = typing.get_args(tp)
        return [_convert(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise wrong
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise wrong
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise wrong
        if not math.isfinite(value):  # .inf / .nan: no recipe number means them
            raise UserError(f"recipe key '{key}' must be a finite number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise wrong
        return value
    raise TypeError(f"unsupported annotation {tp} for {key}")  # a bug in the schema, not in the recipe


def _build(cls, data: Any, prefix: str):
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"recipe section '{prefix}' must be a mapping of keys, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in data.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            valid = [f"{prefix}.{n}" if prefix else n for n in names]
            raise UserError(f"unknown recipe key '{dotted}'{did_you_mean(dotted, valid)}")
        values[key] = _convert(value, hints[key], dotted)
    return cls(**values)


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
THIRD_PARTY_OPTIMIZERS = {"apollo": ("pytorch_optimizer", "baselines")}


def _in_range(key: str, value: float | None, low: float, high: float, *, closed_low=True, closed_high=False) -> None:
    """``value`` (None: not set) must lie in the interval; the error names the key and the interval."""
    if value is None:
        return
    if (value >= low if closed_low else value > low) and (value <= high if closed_high else value < high):
        return
    left, right = "[" if closed_low else "(", "]" if closed_high else ")"
    shown = f"{left}{low}, {high}{right}".replace("inf", "∞")
    raise UserError(f"recipe key '{key}' must be in {shown}, got {value}")


def _check_ranges(recipe: Recipe) -> None:
    """Every number's meaningful range, checked here so that --dry-run rejects what training would."""
    o, s, t, d = recipe.optimizer, recipe.schedule, recipe.trainer, recipe.data
    inf = math.inf
    _in_range("optimizer.weight_decay", o.weight_decay, 0, inf)
    _in_range("optimizer.weight_decay_1d", o.weight_decay_1d, 0, inf)
    _in_range("optimizer.momentum", o.momentum, 0, 1)
    _in_range("optimizer.so_lr", o.so_lr, 0, inf)
    _in_range("optimizer.hessian_momentum", o.hessian_momentum, 0, 1)
    _in_range("optimizer.eps", o.eps, 0, inf, closed_low=False)
    if o.betas is not None:
        if len(o.betas) != 2:
            raise UserError(f"recipe key 'optimizer.betas' takes two numbers [beta1, beta2], got {o.betas}")
        for i, beta in enumerate(o.betas):
            _in_range(f"optimizer.betas[{i}]", beta, 0, 1)
    if o.second_order_kinds is not None:
        from .tagging import CHANNELWISE_KINDS  # here: the recipe module stays free of torch

        for kind in o.second_order_kinds:
            if kind not in CHANNELWISE_KINDS:
                raise UserError(
                    f"recipe key 'optimizer.second_order_kinds': unknown kind '{kind}'"
                    f"{did_you_mean(kind, CHANNELWISE_KINDS)} (kinds: {', '.join(CHANNELWISE_KINDS)})"
                )
    _in_range("schedule.gamma", s.gamma, 0, inf, closed_low=False)
    _in_range("schedule.min_lr", s.min_lr, 0, o.lr, closed_high=True)
    _in_range("schedule.warmup_epochs", s.warmup_epochs, 0, inf)
    _in_range("schedule.warmup_factor", s.warmup_factor, 0, 1, closed_low=False, closed_high=True)
    if any(m < 0 for m in s.milestones):
        raise UserError(f"recipe key 'schedule.milestones' takes epochs >= 0, got {s.milestones}")
    _in_range("trainer.grad_clip", t.grad_clip, 0, inf, closed_low=False)
    _in_range("trainer.divergence_factor", t.divergence_factor, 1, inf, closed_low=False)
    if t.divergence_patience < 1:
        raise UserError(f"recipe key 'trainer.divergence_patience' must be at least 1, got {t.divergence_patience}")
    if t.threads is not None and t.threads < 1:
        raise UserError(f"recipe key 'trainer.threads' must be at least 1 (or null: automatic), got {t.threads}")
    if t.eval_batch_size is not None and t.eval_batch_size < 1:
        raise UserError(f"recipe key 'trainer.eval_batch_size' must be at least 1, got {t.eval_batch_size}")
    for key, value in (("data.img_size", d.img_size), ("data.num_train", d.num_train), ("data.num_test", d.num_test)):
        if value is not None and value < 1:
            raise UserError(f"recipe key '{key}' must be at least 1, got {value}")
    for key, value in (("data.num_classes", d.num_classes), ("data.channels", d.channels)):
        if value < 1:
            raise UserError(f"recipe key '{key}' must be at least 1, got {value}")
    if d.num_workers < 0:
        raise UserError(f"recipe key 'data.num_workers' must be at least 0, got {d.num_workers}")


#: Keys that mean something only for some choices of a section's ``name``; every other key applies
#: always. A recipe that sets one where it does not apply is rejected (it would be silently ignored).
APPLIES_TO: dict[str, dict[str, tuple[str, ...]]] = {
    "optimizer": {
        "momentum": ("sgd", "sgdph"),
        "betas": ("adam", "adamw", "adabelief", "adahessian"),
        "eps": ("sgdph", "adam", "adamw", "adabelief", "adahessian", "apollo"),
        **{
            key: ("sgdph",)
            for key in (
                "so_lr",
                "hessian_momentum",
                "estimator",
                "engine",
                "hessian_every",
                "gnb_fraction",
                "authors_code",
                "rule",
                "second_order_kinds",
            )
        },
    },
    "schedule": {"milestones": ("multistep",), "gamma": ("multistep",), "min_lr": ("cosine",)},
    "data": {
        "root": ("cifar10", "cifar100", "imagefolder"),
        "download": ("cifar10", "cifar100"),
        "train_dir": ("imagefolder",),
        "val_dir": ("imagefolder",),
        "num_classes": ("synthetic",),
        "channels": ("synthetic",),
        "num_train": ("shapes", "synthetic"),
        "num_test": ("shapes", "synthetic"),
    },
}
_SECTIONS = {
    "model": ModelCfg,
    "data": DataCfg,
    "optimizer": OptimizerCfg,
    "schedule": ScheduleCfg,
    "trainer": TrainerCfg,
}


def _check_keys_apply(data: dict, recipe: Recipe) -> None:
    """Reject a key the recipe sets that its section's ``name`` does not use. A section that lists
    every key is a recorded recipe (a run's recipe.yaml, a sweep's base.yaml): there a key that does
    not apply is accepted at its default value, today's or the one it had before it changed
    (``RAN_WITH_BEFORE``), which is how it was recorded."""
    for section, rules in APPLIES_TO.items():
        written = data.get(section)
        if not isinstance(written, dict):
            continue
        cfg = getattr(recipe, section)
        defaults = _SECTIONS[section]()
        recorded = set(written) >= {f.name for f in dataclasses.fields(cfg)}
        for key, names in rules.items():
            if key not in written or cfg.name in names:
                continue
            earlier = RAN_WITH_BEFORE.get(section, {})
            if recorded and (
                getattr(cfg, key) == getattr(defaults, key)  # a default recorded with the rest
                or (key in earlier and getattr(cfg, key) == earlier[key])  # ... or the default it had then
            ):
                continue
            takes = [k for k in (f.name for f in dataclasses.fields(cfg)) if cfg.name in rules.get(k, (cfg.name,))]
            raise UserError(
                f"recipe key '{section}.{key}' does not apply to {section}.name={cfg.name} (it would be ignored); "
                f"remove it. {section}.name={cfg.name} takes: {', '.join(k for k in takes if k != 'name')}"
            )


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


def _check_semantics(recipe: Recipe) -> None:
    t, o, s = recipe.trainer, recipe.optimizer, recipe.schedule
    if o.name in THIRD_PARTY_OPTIMIZERS:
        module, extra = THIRD_PARTY_OPTIMIZERS[o.name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"optimizer.name={o.name} needs the {module} package: pip install 'sgdph-tools[{extra}]'")
    for key, value in (
        ("trainer.epochs", t.epochs),
        ("trainer.batch_size", t.batch_size),
        ("optimizer.hessian_every", o.hessian_every),
        ("trainer.log_every", t.log_every),
    ):
        if value < 1:
            raise UserError(f"recipe key '{key}' must be at least 1, got {value}")
    _check_ranges(recipe)
    if not 0 <= recipe.data.val_fraction < 1:
        raise UserError(
            f"recipe key 'data.val_fraction' must be in [0, 1) (0: no validation set), got {recipe.data.val_fraction}"
        )
    if o.lr <= 0:
        raise UserError(f"recipe key 'optimizer.lr' must be positive, got {o.lr}")
    if s.milestones != sorted(s.milestones):
        raise UserError(f"recipe key 'schedule.milestones' must be increasing, got {s.milestones}")
    if recipe.data.name in ("cifar10", "cifar100", "imagefolder") and not recipe.data.root:
        raise UserError(f"data '{recipe.data.name}' needs data.root: the folder that holds (or will hold) the dataset")
    # authors_code is the paper's rule and estimator: the default rule (normalized) and estimator (gnb) are read
    # as paper and rowsum there, others are an error
    if o.authors_code and (
        o.estimator not in ("rowsum", OptimizerCfg.estimator)  # the default estimator is read as rowsum there
        or o.hessian_every != 1
        or o.second_order_kinds is not None
        or o.rule not in ("paper", OptimizerCfg.rule)
    ):
        raise UserError(
            "optimizer.authors_code=true is the authors' rule: it takes estimator=rowsum, hessian_every=1, "
            "rule=paper and chooses its own parameters (drop optimizer.second_order_kinds)"
        )
    if o.gnb_fraction is not None and not 0 < o.gnb_fraction <= 1:
        raise UserError(f"recipe key 'optimizer.gnb_fraction' must be in (0, 1] or null, got {o.gnb_fraction}")
    if o.estimator != "gnb" and o.gnb_fraction not in (None, OptimizerCfg.gnb_fraction):
        raise UserError(
            f"recipe key 'optimizer.gnb_fraction' applies to optimizer.estimator=gnb only (got {o.gnb_fraction} "
            f"with estimator={o.estimator}): remove it"
        )
    double_backward = o.name == "sgdph" and o.estimator != "gnb" and o.engine in ("autograd", "gauss_newton")
    if t.compile and (o.name == "adahessian" or double_backward):
        raise UserError(
            "trainer.compile=true needs an optimizer without double backward, which torch.compile cannot "
            "differentiate: use optimizer.engine=finite_difference or optimizer.estimator=gnb with sgdph, "
            "or trainer.compile=false"
        )


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
    recipe = _build(Recipe, data, "")
    _check_keys_apply(data, recipe)
    _check_semantics(recipe)
    if recipe.optimizer.authors_code:  # the authors' rule is rowsum: the default estimator is read as that
        recipe.optimizer.estimator = "rowsum"
    if recipe.optimizer.estimator != "gnb":  # the default fraction is gnb's; another estimator has none
        recipe.optimizer.gnb_fraction = None
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
        data = load_yaml(path.read_text())
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
