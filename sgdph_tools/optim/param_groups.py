"""Which parameters take SGD-PH's Newton-type step: the one place that decides.

Every param group of :class:`~sgdph_tools.SGDPH` carries a ``second_order`` flag, set here:

- ``sgdph_param_groups(model)`` sets it from the parameter tags (:mod:`sgdph_tools.tagging`): the
  channel-wise 1-D parameters are second-order, the classifier bias is not. It fits timm's factory
  too: ``create_optimizer_v2(model, "sgdph", param_group_fn=sgdph_param_groups)``.
- Groups without the flag -- ``model.parameters()``, timm's weight-decay / no-weight-decay groups,
  layer-decay groups -- are split by the authors' rule (:func:`second_order_groups`): a parameter is
  second-order when it is 1-D, except the LAST 1-D parameter over all such groups, which is normally
  the classifier bias (its ``H·1`` is exactly zero under softmax cross-entropy).

The optimizer reads the flags and decides nothing else.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch.nn as nn
from torch import Tensor

from .. import checks
from ..tagging import CHANNELWISE_KINDS, KINDS, SECOND_ORDER, WEIGHT, tag_parameters

#: The kinds that may be given the second-order step (kernels are not channel-wise 1-D).
SELECTABLE_KINDS = tuple(k for k in KINDS if k != WEIGHT)


def _check_kinds(kinds: Iterable[str]) -> frozenset[str]:
    kinds = frozenset(kinds)
    unknown = sorted(kinds - set(SELECTABLE_KINDS))
    if unknown:
        raise ValueError(
            f"unknown parameter kind(s) {unknown} for the second-order step; choose from {list(SELECTABLE_KINDS)}"
        )
    return kinds


def sgdph_param_groups(
    model: nn.Module,
    second_order_kinds: Iterable[str] = CHANNELWISE_KINDS,
    *,
    include_frozen: bool = False,
) -> list[dict]:
    """Split ``model``'s parameters into a second-order and a first-order group.

    Args:
        model: the model.
        second_order_kinds: the parameter kinds that get SGD-PH's Newton-type step. Defaults to all
            channel-wise 1-D kinds (as the paper); e.g. ``("norm_weight", "norm_bias")`` restricts it
            to normalisation layers, ``(*CHANNELWISE_KINDS, "other_1d")`` adds unknown 1-D params.
        include_frozen: also list parameters with ``requires_grad=False`` (the optimizer skips
            them while they have no gradient; useful if they are unfrozen later).

    Returns:
        ``[{"params": [...], "second_order": True, "param_names": [...]}, {... False ...}]``; empty
        groups are left out.
    """
    checks.module("model", model)
    kinds = _check_kinds(checks.names("second_order_kinds", second_order_kinds))
    params = dict(model.named_parameters())
    second, first = ([], []), ([], [])
    for name, tag in tag_parameters(model).items():
        param = params[name]
        if not (param.requires_grad or include_frozen):
            continue
        # A channel-wise kind follows its tag's group (which keeps the classifier bias first-order);
        # a kind the user opted in (other_1d) has no such exception.
        chosen = tag.kind in kinds and (tag.group == SECOND_ORDER or tag.kind not in CHANNELWISE_KINDS)
        names, tensors = second if chosen else first
        names.append(name)
        tensors.append(param)
    groups = []
    for (names, tensors), is_second_order in ((second, True), (first, False)):
        if tensors:
            groups.append({"params": tensors, "second_order": is_second_order, "param_names": names})
    return groups


def second_order_groups(params: Iterable[Any], *, authors_code: bool = False) -> list[dict[str, Any]]:
    """Give every param group a ``second_order`` flag; groups without one are split by the authors'
    rule (1-D parameters are second-order, except the last 1-D parameter over all such groups).

    ``params`` is what a ``torch.optim`` optimizer accepts: tensors, ``(name, tensor)`` pairs or
    dicts. The relative order of the 1-D parameters is kept (the authors' round robin follows it).
    With ``authors_code=True`` every group must be left to the rule, as the authors' code decides by
    ``ndim`` alone.
    """
    if isinstance(params, nn.Module):
        raise TypeError(
            "params must be the model's parameters, not the model: pass model.parameters() or sgdph_param_groups(model)"
        )
    groups = list(params)
    if not groups:
        raise ValueError("optimizer got an empty parameter list")
    if not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    for i, g in enumerate(groups):
        if not isinstance(g, dict) or "params" not in g:
            raise ValueError(
                f"param group {i} has no 'params': each group is a dict like {{'params': [...], 'lr': 0.1}} "
                "(or pass a plain list of tensors)"
            )
    groups = [dict(g, params=[g["params"]] if isinstance(g["params"], Tensor) else list(g["params"])) for g in groups]
    if authors_code and any("second_order" in g for g in groups):
        raise ValueError(
            "authors_code=True chooses the second-order parameters by the authors' rule (ndim == 1): pass "
            "model.parameters() or groups without a 'second_order' key (not sgdph_param_groups)"
        )

    def tensor(p):  # torch also accepts (name, tensor) pairs
        return p[1] if isinstance(p, tuple) else p

    undecided = [g for g in groups if "second_order" not in g]
    one_d = [(id(g), i) for g in undecided for i, p in enumerate(g["params"]) if tensor(p).ndim == 1]
    last = one_d[-1] if one_d else None
    decided = []
    for g in groups:
        if "second_order" in g:
            decided.append(g)
            continue
        flags = [tensor(p).ndim == 1 and (id(g), i) != last for i, p in enumerate(g["params"])]
        for flag in (True, False):
            picked = [i for i, f in enumerate(flags) if f == flag]
            if picked:
                part = dict(g, params=[g["params"][i] for i in picked], second_order=flag)
                if "param_names" in g:
                    part["param_names"] = [g["param_names"][i] for i in picked]
                decided.append(part)
    return decided
