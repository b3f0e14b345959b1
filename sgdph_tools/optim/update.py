"""One param group's update: first-order tensors by torch's ``sgd``; second-order tensors by the
flat path (:mod:`.flat`; a refresh folds its estimates in first) or by the functional :func:`~.functional.sgdph`."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim.sgd import sgd as sgd_functional

from .block import BlockInverses, BlockProduct, block_newton_group, is_block_group, keeps_block
from .compiled import CompiledUpdate
from .flat import FlatSecondOrder
from .functional import fold_curvature, sgdph


def update_group(
    state: dict[Tensor, dict[str, Any]],
    group: dict[str, Any],
    hessians: dict[Tensor, Tensor],
    step: int,
    one_d: int,
    flats: dict[int, FlatSecondOrder | None],
    inverses: dict[int, BlockInverses] | None = None,
    product: BlockProduct | None = None,
    exact_index: dict[Tensor, int] | None = None,
    exact: bool = False,
    compiled: CompiledUpdate | None = None,
) -> bool:
    """Update one param group in place; True when it has second-order tensors that were updated.
    ``one_d``: the number of 1-D parameters (the authors' round-robin period); ``flats``: the
    optimizer's flat state per group, filled here on first use. ``block_newton`` groups
    (:mod:`.block`): ``inverses`` their cached block inverses per group, ``product`` and
    ``exact_index`` the exact mode's block products this step; ``exact``: the exact mode is on."""
    if is_block_group(group):
        for p in group["params"]:  # a loaded checkpoint of the other mode, a group added later
            second_order_state(state, p, keeps_block(group, p, exact))
        cache = (inverses if inverses is not None else {}).setdefault(id(group), BlockInverses())
        return block_newton_group(state, group, hessians, cache, product, exact_index or {})
    foreach = True if group["foreach"] is None else group["foreach"]  # on CPU too (fewer Python calls)
    if group["second_order"] and foreach:
        flat = flat_for(state, group, flats)
        if (
            flat is not None
            and refreshed_flat(state, group, flat, hessians)
            and flat.step(
                group,
                state,
                lambda: corrections(state, group, flat.params, step, one_d),
                correction_key(group, step, one_d),
                compiled,
            )
        ):
            return True
    if compiled is not None and not group["second_order"] and compiled.sgd_group(state, group):
        return False
    params = [p for p in group["params"] if p.grad is not None]
    if not params:
        return False
    grads = [p.grad for p in params]  # under no_grad: a gradient's graph (create_graph) is not extended
    bufs = [state[p].get("momentum_buffer") for p in params]
    missing = group["momentum"] != 0 and any(b is None for b in bufs)
    if not group["second_order"]:
        sgd_functional(
            params,
            grads,
            bufs,
            foreach=foreach,
            weight_decay=group["weight_decay"],
            momentum=group["momentum"],
            lr=group["lr"],
            dampening=0.0,
            nesterov=False,
            maximize=False,
        )
    else:
        states = [second_order_state(state, p) for p in params]
        # one multi-tensor add for the step counters (CPU scalars, as torch's Adam)
        torch._foreach_add_([s["step"] for s in states], 1.0)
        fresh = [hessians.get(p) for p in params] if hessians else [None] * len(params)
        for entry, h in zip(states, fresh):
            entry["hessian_refreshes"] += h is not None
        alpha = group["momentum"] if group["authors_code"] else group["hessian_momentum"]
        sgdph(
            params,
            grads,
            bufs,
            [s["hessian_ema"] for s in states],
            fresh,
            corrections(state, group, params, step, one_d),
            foreach=foreach,
            lr=group["lr"],
            momentum=group["momentum"],
            weight_decay=group["weight_decay"],
            so_lr=group["so_lr"],
            hessian_momentum=alpha,
            eps=group["eps"],
            eps_in_correction=group["authors_code"],
            rule=group.get("rule", "paper"),
        )
        flat = flats.get(id(group))
        if flat is not None:
            flat.invalidate()  # the curvature or the corrections may have changed
    if missing:
        for p, buf in zip(params, bufs):
            state[p]["momentum_buffer"] = buf
    return group["second_order"]


def refreshed_flat(
    state: dict[Tensor, dict[str, Any]], group: dict[str, Any], flat: FlatSecondOrder, hessians: dict[Tensor, Tensor]
) -> bool:
    """On a refreshing step, fold the group's fresh estimates into the flat curvature EMA (through its
    views), so that the step itself is the flat one and its divisor, rebuilt once here, serves the steps
    until the next refresh (the general path would compute it for this step and the flat one again on
    the next). False, with nothing changed, where the general path must run: a tensor without a
    gradient, or one still without curvature after this refresh (its step is SGD's)."""
    fresh = [hessians.get(p) for p in flat.params] if hessians else []
    if not any(h is not None for h in fresh):
        return True
    if any(p.grad is None for p in flat.params):
        return False
    if not group["authors_code"] and any(
        h is None and not state[p]["hessian_refreshes"] for p, h in zip(flat.params, fresh)
    ):
        return False
    pairs = [(state[p], h) for p, h in zip(flat.params, fresh) if h is not None]
    for entry, _ in pairs:
        entry["hessian_refreshes"] += 1
    alpha = group["momentum"] if group["authors_code"] else group["hessian_momentum"]
    fold_curvature([entry["hessian_ema"] for entry, _ in pairs], [h for _, h in pairs], alpha)
    flat.invalidate()
    return True


def corrections(
    state: dict[Tensor, dict[str, Any]], group: dict[str, Any], params: list[Tensor], step: int, one_d: int
) -> list[float | None]:
    """Each tensor's bias correction of its curvature EMA (None: no curvature yet)."""
    if group["authors_code"]:
        return [authors_correction(group, step, one_d)] * len(params)
    alpha = group["hessian_momentum"]
    counts = [state[p]["hessian_refreshes"] for p in params]
    return [1 - alpha**n if n else None for n in counts]


def authors_correction(group: dict[str, Any], step: int, one_d: int) -> float:
    """The authors' approximate bias correction, ``1 - β^(⌊t/M⌋+1)``, M the number of 1-D parameters."""
    return 1 - group["momentum"] ** (step // one_d + 1)


def correction_key(group: dict[str, Any], step: int, one_d: int) -> float | None:
    """What the corrections depend on besides the refresh counts (which change only on refreshes)."""
    return authors_correction(group, step, one_d) if group["authors_code"] else None


def flat_for(
    state: dict[Tensor, dict[str, Any]], group: dict[str, Any], flats: dict[int, FlatSecondOrder | None]
) -> FlatSecondOrder | None:
    """The group's flat state (built on first use, after a load or a new group; None: it does not fit)."""
    if id(group) not in flats:
        params = [p for p in group["params"] if p.requires_grad]
        fits = FlatSecondOrder.fits(params, state, group["momentum"])
        flats[id(group)] = FlatSecondOrder(params, state, group["momentum"]) if fits else None
    return flats[id(group)]


def second_order_state(state: dict[Tensor, dict[str, Any]], p: Tensor, block: bool = False) -> dict[str, Any]:
    """A second-order tensor's state, created where missing (a new group, an old checkpoint):
    ``hessian_ema`` (the curvature's diagonal), or ``hessian_block`` (``[n, n]``) where ``block``."""
    entry = state[p]
    if "step" not in entry:
        entry["step"] = torch.tensor(0.0)  # as torch's Adam: a CPU scalar tensor per parameter
    if block:
        if "hessian_block" not in entry:
            n = p.numel()
            entry["hessian_block"] = torch.zeros(n, n, dtype=p.dtype, device=p.device)
            entry["hessian_refreshes"] = 0
    elif "hessian_ema" not in entry:
        entry["hessian_ema"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        entry["hessian_refreshes"] = 0
    return entry
