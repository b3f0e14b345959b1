"""Registration with timm's optimizer factory, so that once ``sgdph_tools`` is imported
``timm.optim.create_optimizer_v2(model, opt="sgdph", ...)`` builds an :class:`SGDPH`.

timm's factory hands the optimizer its own param groups (weight-decay / no-weight-decay), which
carry no ``second_order`` flag: SGDPH then applies the authors' rule (1-D params second-order, the
last one first-order). For the tag-based groups pass
``param_group_fn=sgdph_tools.sgdph_param_groups``.
"""
from __future__ import annotations

from timm.optim import OptimInfo
from timm.optim._optim_factory import default_registry

from .sgdph import SGDPH


def register_with_timm() -> None:
    """Register ``sgdph`` (autograd engine, needs ``create_graph``) and ``sgdphfd`` (finite
    differences, needs ``step(loss_fn=...)``). Idempotent."""
    registered = set(default_registry.list_optimizers())
    infos = [
        OptimInfo(
            name="sgdph",
            opt_class=SGDPH,
            description="SGD with Partial Hessian: SGDM plus a Newton-type step for channel-wise 1-D params",
            has_eps=True,
            has_momentum=True,
            second_order=True,
        ),
        OptimInfo(
            name="sgdphfd",
            opt_class=SGDPH,
            description="SGD-PH with finite-difference HVPs (call step(loss_fn=...))",
            has_eps=True,
            has_momentum=True,
            defaults={"engine": "finite_difference"},
        ),
    ]
    for info in infos:
        if info.name not in registered:
            default_registry.register(info)
