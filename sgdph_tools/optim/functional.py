"""The functional form of SGD-PH's update for the second-order (channel-wise 1-D) parameters, as
``torch/optim/sgd.py``'s ``sgd`` is SGD's: pure tensor arithmetic on lists, for-loop or foreach.
The first-order parameters take torch's ``sgd`` itself."""

from __future__ import annotations

from typing import cast

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import _default_to_fused_or_foreach

from ..curvature import check_choice
from ..curvature.sharded import is_sharded

__all__ = ["sgdph", "step_denominators", "RULES", "DIAGONAL_RULES", "DEFAULT_RULE", "DEFAULT_EPS", "DEFAULT_SO_LR"]

#: How a diagonal curvature EMA turns into a step (the class docstring gives the formulas); this
#: module's update implements them.
DIAGONAL_RULES = ("paper", "damped", "normalized")
#: Every ``rule=``: the diagonal ones, ``block_newton`` (a solve on each tensor's Gauss-Newton block,
#: :mod:`sgdph_tools.optim.block`) and ``block_normalized`` (the same direction at SGD's length).
RULES = (*DIAGONAL_RULES, "block_newton", "block_normalized")
#: The rule when none is given: ``normalized``, chosen by the study in docs/evidence.md (it ties SGDM
#: with BatchNorm and beats it without; the paper's rule lost on both nets and diverged on one seed).
#: ``authors_code=True`` implies the paper's rule.
DEFAULT_RULE = "normalized"
#: ε when none is given: the paper's for its rule; for ``normalized`` ε is relative to the tensor's mean
#: curvature (0.3: r between 0 and 4.3), the value the study chose on validation in all four of its
#: ``normalized`` contenders (grid 0.3, 1); for ``damped`` it is an absolute curvature with no
#: scale-free value -- 0.3 is where the weight-norm study saw SGD-PH train as well as SGDM.
#: ``block_newton``'s is absolute (its calibration on no-BN shapes); ``block_normalized``'s relative to the
#: block's mean diagonal.
DEFAULT_EPS = {"paper": 1e-4, "damped": 0.3, "normalized": 0.3, "block_newton": 1e-3, "block_normalized": 0.1}
#: τ when none is given: the paper's for its rule (the other diagonal rules do not use it); for
#: ``block_newton`` the scale of the Newton direction (docs/evidence.md).
DEFAULT_SO_LR = {"paper": 1e-3, "damped": 1e-3, "normalized": 1e-3, "block_newton": 1e-2, "block_normalized": 1e-3}


def sgdph(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    hessian_emas: list[Tensor],
    hessians: list[Tensor | None],
    bias_corrections: list[float | None],
    *,
    foreach: bool | None = None,
    lr: float,
    momentum: float,
    weight_decay: float,
    so_lr: float,
    hessian_momentum: float,
    eps: float,
    eps_in_correction: bool = False,
    rule: str = DEFAULT_RULE,
) -> None:
    r"""Functional form of SGD-PH's second-order update (first-order params use torch's ``sgd``).

    For each tensor i, in place::

        buf ← g (no buffer yet, or β = 0: g itself)   else β·buf + g
        if hessians[i] is given:   D ← α·D + (1 - α)·|h|
        c = bias_corrections[i]
        c is None (no curvature yet):  θ ← θ - γ·(buf + λθ)
        otherwise:                     θ ← θ - γ·(r ⊙ buf + λθ),  D̂ = D / c
            r = τ / (D̂ + ε)                     rule "paper"
                τ·c / (D + ε)                   rule "paper", eps_in_correction (the authors' code)
                1 / (1 + D̂ / ε)                 rule "damped"
                (1 + ε) / (D̂ / mean(D̂) + ε)     rule "normalized" (mean over the tensor)

    ``momentum_buffers`` entries that are None are created (the list is updated). With
    ``foreach`` the tensors are grouped by device and dtype and updated with ``torch._foreach_*``
    kernels; the default follows torch (foreach on CUDA).
    """
    if not (
        len(params)
        == len(grads)
        == len(momentum_buffers)
        == len(hessian_emas)
        == len(hessians)
        == len(bias_corrections)
    ):
        raise ValueError(
            "sgdph: params, grads, momentum_buffers, hessian_emas, hessians and bias_corrections "
            "must have one entry per parameter"
        )
    check_choice("rule", rule, DIAGONAL_RULES)
    if eps_in_correction and rule != "paper":
        raise ValueError("eps_in_correction (the authors' code) goes with rule='paper'")
    if foreach is None:
        _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
    update = _multi_tensor_sgdph if foreach else _single_tensor_sgdph
    update(
        params,
        grads,
        momentum_buffers,
        hessian_emas,
        hessians,
        bias_corrections,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        so_lr=so_lr,
        hessian_momentum=hessian_momentum,
        eps=eps,
        eps_in_correction=eps_in_correction,
        rule=rule,
    )


def step_denominators(
    emas: list[Tensor], corrections: list[float], *, so_lr: float, eps: float, eps_in_correction: bool, rule: str
) -> tuple[list[Tensor], float]:
    """``(denominators, numerator)`` with the step relative to SGD's ``r = numerator / denominator``
    per element, for tensors that have a curvature estimate (new tensors; ``emas`` are not
    changed). One implementation for both update paths; callers compute ``buf / d * numerator``."""
    if eps_in_correction:  # the authors' code: (D + ε) / c
        denoms = torch._foreach_add(emas, eps)
        torch._foreach_div_(denoms, corrections)
        return denoms, so_lr
    curvature = torch._foreach_div(emas, corrections)  # D̂
    if rule == "paper":
        torch._foreach_add_(curvature, eps)
        return curvature, so_lr
    if rule == "damped":
        torch._foreach_div_(curvature, eps)
        torch._foreach_add_(curvature, 1.0)
        return curvature, 1.0
    # normalized: a tensor whose curvature is all zero has mean 0 and 0/0 = nan there; it gets r = 1.
    if is_sharded(curvature):  # FSDP2: per shard (laid end to end, shards would be gathered whole)
        relative = [torch.nan_to_num_(d / d.mean(), nan=1.0) for d in curvature]
        torch._foreach_add_(relative, eps)
        return relative, 1.0 + eps
    # Each mean is its tensor's own reduction (a segment reduction over all would sum in another order
    # and change bits); the division, nan_to_num and ε then run once over all tensors laid end to end,
    # element for element the same arithmetic: 3 kernels instead of 3 per tensor.
    means = [d.mean() for d in curvature]
    sizes = [d.numel() for d in curvature]
    relative = torch.cat([d if d.ndim == 1 else d.reshape(-1) for d in curvature])
    relative.div_(torch.cat([m.expand(n) for m, n in zip(means, sizes)]))
    relative.nan_to_num_(nan=1.0).add_(eps)
    return [r if d.ndim == 1 else r.view_as(d) for r, d in zip(relative.split(sizes), curvature)], 1.0 + eps


def fold_curvature(emas: list[Tensor], hessians: list[Tensor], hessian_momentum: float) -> None:
    """``D ← α·D + (1 - α)·|h|`` for each pair, in multi-tensor kernels (one device and dtype)."""
    torch._foreach_mul_(emas, hessian_momentum)
    torch._foreach_add_(emas, torch._foreach_abs(hessians), alpha=1 - hessian_momentum)


def _single_tensor_sgdph(
    params,
    grads,
    momentum_buffers,
    hessian_emas,
    hessians,
    bias_corrections,
    *,
    lr,
    momentum,
    weight_decay,
    so_lr,
    hessian_momentum,
    eps,
    eps_in_correction,
    rule,
) -> None:
    for i, param in enumerate(params):
        grad = grads[i]
        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:
                buf = momentum_buffers[i] = torch.clone(grad).detach()
            else:
                buf.mul_(momentum).add_(grad)
        else:
            buf = grad
        if hessians[i] is not None:
            hessian_emas[i].mul_(hessian_momentum).add_(hessians[i].abs(), alpha=1 - hessian_momentum)
        c = bias_corrections[i]
        if c is None:
            direction = buf.add(param, alpha=weight_decay) if weight_decay != 0 else buf
        else:
            (denom,), numerator = step_denominators(
                [hessian_emas[i]], [c], so_lr=so_lr, eps=eps, eps_in_correction=eps_in_correction, rule=rule
            )
            direction = buf.div(denom).mul_(numerator)
            if weight_decay != 0:
                direction.add_(param, alpha=weight_decay)
        param.add_(direction, alpha=-lr)


def _multi_tensor_sgdph(
    params,
    grads,
    momentum_buffers,
    hessian_emas,
    hessians,
    bias_corrections,
    *,
    lr,
    momentum,
    weight_decay,
    so_lr,
    hessian_momentum,
    eps,
    eps_in_correction,
    rule,
) -> None:
    if not params:
        return
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, momentum_buffers, hessian_emas, hessians],
        with_indices=True,  # type: ignore[list-item]
    )
    for (dev_params, dev_grads, dev_bufs, dev_emas, dev_hessians), indices in grouped.values():
        dev_params, dev_grads, dev_emas = (cast(list[Tensor], x) for x in (dev_params, dev_grads, dev_emas))
        if momentum != 0:
            old = [i for i, b in enumerate(dev_bufs) if b is not None]
            if old:
                old_bufs = [cast(Tensor, dev_bufs[i]) for i in old]
                torch._foreach_mul_(old_bufs, momentum)
                torch._foreach_add_(old_bufs, [dev_grads[i] for i in old])
            for i, b in enumerate(dev_bufs):
                if b is None:
                    dev_bufs[i] = momentum_buffers[indices[i]] = torch.clone(dev_grads[i]).detach()
            steps = cast(list[Tensor], dev_bufs)
        else:
            steps = dev_grads
        fresh = [i for i, h in enumerate(dev_hessians) if h is not None]
        if fresh:
            fold_curvature(
                [dev_emas[i] for i in fresh], [cast(Tensor, dev_hessians[i]) for i in fresh], hessian_momentum
            )
        corrections = [bias_corrections[j] for j in indices]
        pre = [i for i, c in enumerate(corrections) if c is not None]
        raw = [i for i, c in enumerate(corrections) if c is None]
        directions: list[Tensor] = [steps[i] for i in range(len(dev_params))]
        if pre:
            denoms, numerator = step_denominators(
                [dev_emas[i] for i in pre],
                [cast(float, corrections[i]) for i in pre],
                so_lr=so_lr,
                eps=eps,
                eps_in_correction=eps_in_correction,
                rule=rule,
            )
            pre_dirs = torch._foreach_div([steps[i] for i in pre], denoms)
            torch._foreach_mul_(pre_dirs, numerator)
            if weight_decay != 0:
                torch._foreach_add_(pre_dirs, [dev_params[i] for i in pre], alpha=weight_decay)
            for i, d in zip(pre, pre_dirs):
                directions[i] = d
        if raw and weight_decay != 0:
            raw_dirs = torch._foreach_add([steps[i] for i in raw], [dev_params[i] for i in raw], alpha=weight_decay)
            for i, d in zip(raw, raw_dirs):
                directions[i] = d
        torch._foreach_add_(dev_params, directions, alpha=-lr)
