"""Registration with timm's optimizer factory: once ``sgdph_tools`` is imported,
``timm.optim.create_optimizer_v2(model, opt=NAME, ...)`` (and timm's ``train.py --opt NAME``) builds
an :class:`SGDPH`.

Only what timm's training loop can drive is registered. That loop runs
``loss.backward(create_graph=optimizer.is_second_order)`` then ``optimizer.step()`` -- no closure --
so every name uses the autograd engine; the finite-difference engine needs a closure or
``step(loss_fn=...)`` and is built with ``SGDPH(..., engine="finite_difference")`` directly.

timm's factory hands the optimizer its own param groups (weight-decay / no-weight-decay), which
carry no ``second_order`` flag: SGDPH then applies the authors' rule (1-D params second-order, the
last one first-order). For the tag-based groups pass ``param_group_fn=sgdph_tools.sgdph_param_groups``.
timm splits optimizer names at ``_`` (``lookahead_sgdph``), hence names without one.

:class:`BlockHessianFree` is not registered: timm's loop calls ``step()`` without a closure, and the
method must evaluate the loss again at the new parameters (and be given the model).
"""

from __future__ import annotations

from timm.optim import OptimInfo
from timm.optim._optim_factory import default_registry

from .sgdph import SGDPH

#: name -> (description, constructor defaults); all drivable by timm's train.py.
TIMM_OPTIMIZERS = {
    "sgdph": ("SGD with Partial Hessian: SGDM plus a Newton-type step for channel-wise 1-D params (rowsum)", {}),
    "sgdphhutchinson": (
        "SGD-PH with Hutchinson's unbiased diagonal estimate, one HVP for all 1-D params",
        {"estimator": "hutchinson"},
    ),
    "sgdphauthors": ("SGD-PH as the authors' released sgdph.py computes it", {"authors_code": True}),
}


def register_with_timm() -> None:
    """Register the names of :data:`TIMM_OPTIMIZERS` with timm's factory. Idempotent."""
    registered = set(default_registry.list_optimizers())
    for name, (description, defaults) in TIMM_OPTIMIZERS.items():
        if name not in registered:
            default_registry.register(
                OptimInfo(
                    name=name,
                    opt_class=SGDPH,
                    description=description,
                    has_eps=True,
                    has_momentum=True,
                    second_order=True,
                    defaults=defaults or None,
                )
            )
