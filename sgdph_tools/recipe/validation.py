"""Recipe validation: types (from the schema's annotations), ranges and applicability (from its
fields' metadata), and the rules that tie keys together. Every failure is a one-line
:class:`~sgdph_tools.errors.UserError` naming the key and the fix, raised before anything is built,
so ``--dry-run`` rejects what training would."""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import types
import typing
from typing import Any, Literal

from ..curvature.capabilities import needs
from ..curvature.sharded import unsupported
from ..errors import UserError, did_you_mean
from .schema import APPLIES_TO, RAN_WITH_BEFORE, SECTIONS, OptimizerCfg, Recipe

#: Optimizers from a package outside the hard dependencies: name -> (module, the extra that installs it).
THIRD_PARTY_OPTIMIZERS = {"apollo": ("pytorch_optimizer", "baselines")}


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


def build(data: Any) -> Recipe:
    """A :class:`Recipe` from a dict of sections, every value checked against its annotation."""
    return _build(Recipe, data, "")


# ----------------------------------------------------------------------------- ranges


def _interval_error(key: str, value: float, interval: tuple[float, float, bool, bool], optional: bool) -> str:
    low, high, closed_low, closed_high = interval
    shown = f"{'[' if closed_low else '('}{low}, {high}{']' if closed_high else ')'}".replace("inf", "∞")
    return f"recipe key '{key}' must be in {shown}{' or null' if optional else ''}, got {value}"


def _inside(value: float, interval: tuple[float, float, bool, bool]) -> bool:
    low, high, closed_low, closed_high = interval
    return (value >= low if closed_low else value > low) and (value <= high if closed_high else value < high)


def check_ranges(recipe: Recipe) -> None:
    """Every number against its field's ``at_least`` / ``interval``, then the ranges that depend on
    another key or on more than one number."""
    for section in SECTIONS:
        cfg = getattr(recipe, section)
        hints = typing.get_type_hints(type(cfg))
        for f in dataclasses.fields(cfg):
            value, key = getattr(cfg, f.name), f"{section}.{f.name}"
            if value is None:
                continue
            if "at_least" in f.metadata and value < f.metadata["at_least"]:
                null = " (or null: automatic)" if type(None) in typing.get_args(hints[f.name]) else ""
                raise UserError(f"recipe key '{key}' must be at least {f.metadata['at_least']}{null}, got {value}")
            if "interval" in f.metadata and not _inside(value, f.metadata["interval"]):
                optional = type(None) in typing.get_args(hints[f.name])
                raise UserError(_interval_error(key, value, f.metadata["interval"], optional))
    o, s = recipe.optimizer, recipe.schedule
    if o.betas is not None:
        if len(o.betas) != 2:
            raise UserError(f"recipe key 'optimizer.betas' takes two numbers [beta1, beta2], got {o.betas}")
        for i, beta in enumerate(o.betas):
            if not 0 <= beta < 1:
                raise UserError(_interval_error(f"optimizer.betas[{i}]", beta, (0, 1, True, False), False))
    if o.second_order_kinds is not None:
        from ..tagging import CHANNELWISE_KINDS  # here: recipe validation stays free of torch

        for kind in o.second_order_kinds:
            if kind not in CHANNELWISE_KINDS:
                raise UserError(
                    f"recipe key 'optimizer.second_order_kinds': unknown kind '{kind}'"
                    f"{did_you_mean(kind, CHANNELWISE_KINDS)} (kinds: {', '.join(CHANNELWISE_KINDS)})"
                )
    if not 0 <= s.min_lr <= o.lr:
        raise UserError(_interval_error("schedule.min_lr", s.min_lr, (0, o.lr, True, True), False))
    if any(m < 0 for m in s.milestones):
        raise UserError(f"recipe key 'schedule.milestones' takes epochs >= 0, got {s.milestones}")
    if s.milestones != sorted(s.milestones):
        raise UserError(f"recipe key 'schedule.milestones' must be increasing, got {s.milestones}")


# ----------------------------------------------------------------------------- applicability


def check_keys_apply(data: dict, recipe: Recipe) -> None:
    """Reject a key the recipe sets that its section's ``name`` does not use. A section that lists
    every key is a recorded recipe (a run's recipe.yaml, a sweep's base.yaml): there a key that does
    not apply is accepted at its default value, today's or the one it had before it changed
    (``RAN_WITH_BEFORE``), which is how it was recorded."""
    for section, rules in APPLIES_TO.items():
        written = data.get(section)
        if not isinstance(written, dict):
            continue
        cfg = getattr(recipe, section)
        defaults = SECTIONS[section]()
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


# ----------------------------------------------------------------------------- rules across keys


def check_semantics(recipe: Recipe) -> None:
    t, o = recipe.trainer, recipe.optimizer
    if o.name in THIRD_PARTY_OPTIMIZERS:
        module, extra = THIRD_PARTY_OPTIMIZERS[o.name]
        if importlib.util.find_spec(module) is None:
            raise UserError(f"optimizer.name={o.name} needs the {module} package: pip install 'sgdph-tools[{extra}]'")
    check_ranges(recipe)
    if recipe.data.name in ("cifar10", "cifar100", "imagefolder") and not recipe.data.root:
        raise UserError(f"data '{recipe.data.name}' needs data.root: the folder that holds (or will hold) the dataset")
    # authors_code is the paper's rule and estimator: the default rule (normalized) and estimator (gnb) are read
    # as paper and rowsum there (resolve_sgdph_choices), others are an error
    if o.authors_code and (
        o.estimator not in ("rowsum", OptimizerCfg.estimator)
        or o.hessian_every not in (1, OptimizerCfg.hessian_every)  # the default is read as 1 there
        or o.second_order_kinds is not None
        or o.rule not in ("paper", OptimizerCfg.rule)
    ):
        raise UserError(
            "optimizer.authors_code=true is the authors' rule: it takes estimator=rowsum, hessian_every=1, "
            "rule=paper and chooses its own parameters (drop optimizer.second_order_kinds)"
        )
    if o.estimator != "gnb" and o.gnb_fraction not in (None, OptimizerCfg.gnb_fraction):
        raise UserError(
            f"recipe key 'optimizer.gnb_fraction' applies to optimizer.estimator=gnb only (got {o.gnb_fraction} "
            f"with estimator={o.estimator}): remove it"
        )
    blocks = o.name == "sgdph" and o.rule in ("block_newton", "block_normalized")
    if blocks and o.estimator != "gnb" and o.engine != "gauss_newton":
        raise UserError(
            f"optimizer.rule={o.rule} needs Gauss-Newton curvature, not estimator={o.estimator} with "
            f"engine={o.engine}: set optimizer.estimator=gnb (the block estimate) or "
            "optimizer.engine=gauss_newton (exact)"
        )
    if blocks and o.rule == "block_normalized" and o.engine == "gauss_newton":
        raise UserError(
            "optimizer.rule=block_normalized takes its damping relative to the estimated block: set "
            "optimizer.estimator=gnb with engine autograd, or optimizer.rule=block_newton for the exact CG solve"
        )
    if o.name == "block_hf":
        if o.weight_decay_1d is not None:
            raise UserError(
                "optimizer.weight_decay_1d does not apply to optimizer.name=block_hf: its blocks are layers "
                "(weight and bias together) with one weight decay each; remove it"
            )
        if t.precision == "fp16":
            raise UserError(
                "optimizer.name=block_hf cannot run with trainer.precision=fp16 (its closure is evaluated again "
                "without a GradScaler): use trainer.precision=bf16 or fp32"
            )
    if t.compile_mode != "default" and not t.compile:
        raise UserError(f"trainer.compile_mode={t.compile_mode} applies to a compiled run: set trainer.compile=true")
    if t.strategy == "fsdp":
        check_fsdp(o, t)
    exact_blocks = o.name == "sgdph" and o.rule == "block_newton" and o.engine == "gauss_newton"
    double_backward = o.name == "sgdph" and needs(o.estimator, o.engine, exact_blocks=exact_blocks).double_backward
    if t.compile and (o.name == "adahessian" or double_backward):
        raise UserError(
            "trainer.compile=true needs an optimizer without double backward, which torch.compile cannot "
            "differentiate: use optimizer.engine=finite_difference or optimizer.estimator=gnb with sgdph, "
            "or trainer.compile=false"
        )


def check_fsdp(o: OptimizerCfg, t: Any) -> None:
    """What trainer.strategy=fsdp can run (``sgdph_tools/curvature/sharded.py`` says why)."""
    if o.name == "sgdph":
        reason = unsupported(o.estimator, o.engine, o.gnb_fraction, [o.rule])
        if reason is not None:
            raise UserError(f"trainer.strategy=fsdp: {reason}")
    elif o.name in ("block_hf", "adahessian"):
        why = "GGN-vector products" if o.name == "block_hf" else "a double backward"
        raise UserError(
            f"optimizer.name={o.name} needs {why}, which FSDP2's sharded parameters do not give: use "
            "trainer.strategy=ddp, or optimizer.name=sgdph"
        )
    if t.precision == "fp16":
        raise UserError("trainer.strategy=fsdp runs fp32 or bf16 (FSDP2's mixed precision): use trainer.precision=bf16")


def resolve_sgdph_choices(o: OptimizerCfg) -> None:
    """The one home of three reading rules, applied in place: ``authors_code`` is the paper's rowsum
    refreshed every step (the default estimator and interval are read as that), block_newton's exact
    mode solves every step (``hessian_every`` is read as 1), and ``gnb_fraction``
    belongs to gnb (another estimator has none). Recipes apply it when loaded, so recorded recipes say
    what ran; the optimizer builder applies it to a config made directly."""
    if o.authors_code:
        o.estimator, o.hessian_every = "rowsum", 1
    if o.rule == "block_newton" and o.engine == "gauss_newton":  # the exact blocks are solved at every step
        o.hessian_every = 1
    if o.estimator != "gnb":
        o.gnb_fraction = None
