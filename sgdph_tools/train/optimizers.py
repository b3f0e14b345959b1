"""The optimizers a recipe can name, and the learning-rate schedule.

Where each comes from (so results can be traced to an implementation):

| recipe name | implementation |
|---|---|
| ``sgdph`` | ``sgdph_tools.SGDPH`` with the groups of ``sgdph_param_groups`` (``authors_code``: the authors' rule) |
| ``sgd`` | ``torch.optim.SGD`` with momentum, no Nesterov (timm's factory name ``momentum``) |
| ``adam``, ``adamw`` | ``torch.optim.Adam`` / ``torch.optim.AdamW`` via timm's factory |
| ``adabelief``, ``adahessian`` | ``timm.optim.AdaBelief`` / ``timm.optim.Adahessian`` via timm's factory |
| ``apollo`` | ``pytorch_optimizer.ApolloDQN`` (Apollo, Ma 2020; official defaults: 500 warmup steps) |
| ``block_hf`` | ``sgdph_tools.optim.BlockHessianFree`` (Zhang et al. 2017), one block per layer |

Weight decay applies to every parameter, as in the paper's runs (timm's factory is asked not to
exempt 1-D parameters), unless ``weight_decay_1d`` gives the 1-D parameters (``ndim <= 1``: biases,
norm gains, weight-norm gammas) their own value -- 0 is timm's default, ``filter_bias_and_bn``.
Second-order baselines report ``is_second_order`` and the trainer runs
``backward(create_graph=True)`` for them.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn as nn
from timm.optim import create_optimizer_v2

from ..optim import SGDPH, BlockHessianFree, sgdph_param_groups
from ..recipe import OptimizerCfg, ScheduleCfg, resolve_sgdph_choices
from ..tagging import CHANNELWISE_KINDS

_TIMM_NAMES = {
    "sgd": "momentum",
    "adam": "adam",
    "adamw": "adamw",
    "adabelief": "adabelief",
    "adahessian": "adahessian",
}


def build_optimizer(cfg: OptimizerCfg, model: nn.Module) -> torch.optim.Optimizer:
    extra = dict(cfg.kwargs)
    if cfg.eps is not None:
        extra["eps"] = cfg.eps
    if cfg.name == "sgdph":
        cfg = dataclasses.replace(cfg)
        resolve_sgdph_choices(cfg)  # a config built directly, as a loaded recipe is
        kinds = cfg.second_order_kinds if cfg.second_order_kinds is not None else CHANNELWISE_KINDS
        # The authors' rule picks its parameters by ndim, from the plain parameter list.
        params = model.parameters() if cfg.authors_code else sgdph_param_groups(model, kinds)
        params = _with_1d_decay(params, cfg.weight_decay_1d)
        return SGDPH(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            weight_decay=cfg.weight_decay,
            so_lr=cfg.so_lr,
            hessian_momentum=cfg.hessian_momentum,
            estimator=cfg.estimator,
            engine=cfg.engine,
            hessian_every=cfg.hessian_every,
            gnb_fraction=cfg.gnb_fraction,
            authors_code=cfg.authors_code,
            rule=None if cfg.authors_code else cfg.rule,  # None: SGDPH's own choice, the paper's rule for authors_code
            cg_steps=cfg.cg_steps,
            block_max=cfg.block_max,
            block_chunks=cfg.block_chunks,
            model=model,
            **extra,
        )
    if cfg.name == "block_hf":
        return BlockHessianFree(
            model,
            lr=cfg.lr,
            damping=cfg.damping,
            adapt_damping=cfg.adapt_damping,
            cg_max_iters=cfg.cg_max_iters,
            cg_tol=cfg.cg_tol,
            weight_decay=cfg.weight_decay,
            backtracking=cfg.backtracking,
            curvature_fraction=cfg.curvature_fraction,
            **extra,
        )
    if cfg.name == "apollo":
        from pytorch_optimizer import ApolloDQN  # an extra: the recipe's validation names it when missing

        return ApolloDQN(
            _with_1d_decay(model.parameters(), cfg.weight_decay_1d), lr=cfg.lr, weight_decay=cfg.weight_decay, **extra
        )
    if cfg.betas is not None:
        extra["betas"] = tuple(cfg.betas)
    if cfg.name == "sgd":
        extra["momentum"] = cfg.momentum
    return create_optimizer_v2(
        _with_1d_decay(model, cfg.weight_decay_1d),
        opt=_TIMM_NAMES[cfg.name],
        lr=cfg.lr,
        weight_decay=cfg.weight_decay,
        filter_bias_and_bn=False,
        **extra,
    )


def _with_1d_decay(params, weight_decay_1d: float | None):
    """``params`` (a model, parameters or param groups) unchanged when ``weight_decay_1d`` is None;
    otherwise param groups in which the 1-D parameters sit apart, with that weight decay (the other
    keys of their group kept, so SGD-PH's second-order flag and names follow them)."""
    if weight_decay_1d is None:
        return params
    if isinstance(params, nn.Module):
        params = params.parameters()
    groups = list(params)
    if groups and not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    split = []
    for group in groups:
        names = group.get("param_names")
        for one_d in (False, True):
            picked = [i for i, p in enumerate(group["params"]) if (p.ndim <= 1) == one_d]
            if not picked:
                continue
            part = dict(group, params=[group["params"][i] for i in picked])
            if names is not None:
                part["param_names"] = [names[i] for i in picked]
            if one_d:
                part["weight_decay"] = weight_decay_1d
            split.append(part)
    return split


def lr_factor(cfg: ScheduleCfg, epoch: float, epochs: int, base_lr: float) -> float:
    """The learning rate at (fractional) ``epoch``, as a factor of the base lr."""
    if cfg.name == "multistep":
        factor = cfg.gamma ** sum(1 for m in cfg.milestones if int(epoch) >= m)
    elif cfg.name == "cosine":
        floor = cfg.min_lr / base_lr
        factor = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(epoch / epochs, 1.0)))
    else:
        factor = 1.0
    if epoch < cfg.warmup_epochs:
        factor *= cfg.warmup_factor + (1 - cfg.warmup_factor) * epoch / cfg.warmup_epochs
    return factor


def build_scheduler(
    cfg: ScheduleCfg, optimizer: torch.optim.Optimizer, epochs: int, iters_per_epoch: int, base_lr: float
):
    """A LambdaLR stepped once per iteration (warmup and cosine are smooth; multistep changes at the
    first iteration of a milestone epoch, as torch's MultiStepLR stepped per epoch)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda it: lr_factor(cfg, it / iters_per_epoch, epochs, base_lr)
    )
