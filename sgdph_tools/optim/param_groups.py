"""Optimizer parameter groups built from the parameter tags.

``sgdph_param_groups(model)`` returns two groups for :class:`~sgdph_tools.SGDPH`, one with
``second_order=True`` (the channel-wise 1-D parameters) and one with ``second_order=False``; the
classifier bias stays first-order (see :mod:`sgdph_tools.tagging`). It fits timm's factory too:
``create_optimizer_v2(model, "sgdph", param_group_fn=sgdph_param_groups)``.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch.nn as nn

from ..tagging import CHANNELWISE_KINDS, KINDS, SECOND_ORDER, WEIGHT, tag_parameters

#: The kinds that may be given the second-order step (kernels are not channel-wise 1-D).
SELECTABLE_KINDS = tuple(k for k in KINDS if k != WEIGHT)


def _check_kinds(kinds: Iterable[str]) -> frozenset[str]:
    kinds = frozenset(kinds)
    unknown = sorted(kinds - set(SELECTABLE_KINDS))
    if unknown:
        raise ValueError(
            f"unknown parameter kind(s) {unknown} for the second-order step; "
            f"choose from {list(SELECTABLE_KINDS)}"
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
    kinds = _check_kinds(second_order_kinds)
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
