"""Moved to :mod:`sgdph_tools.curvature` (estimators, products, replays); this module keeps the old
import path working."""

from .curvature.capabilities import HESSIAN_ENGINES as ENGINES
from .curvature.capabilities import PRODUCT_ESTIMATORS as ESTIMATORS
from .curvature.estimators import estimate, partial_hessian, rademacher_like
from .curvature.products import HVP, AutogradHVP, FiniteDifferenceHVP, finite_difference_step, math_attention
from .curvature.replay import ClosureReplay, ForwardReplay, gradients_only_for, module_buffers_restored, rng_preserved

__all__ = [
    "ENGINES",
    "ESTIMATORS",
    "HVP",
    "AutogradHVP",
    "ClosureReplay",
    "FiniteDifferenceHVP",
    "ForwardReplay",
    "estimate",
    "finite_difference_step",
    "gradients_only_for",
    "math_attention",
    "module_buffers_restored",
    "partial_hessian",
    "rademacher_like",
    "rng_preserved",
]
