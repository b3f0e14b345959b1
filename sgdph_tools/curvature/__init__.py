"""Everything that estimates curvature for SGD-PH's channel-wise 1-D parameters.

- :mod:`.capabilities`: estimator and engine names, and what each choice needs (one table).
- :mod:`.replay`: running the loss again as the same function (RNG, module buffers).
- :mod:`.products`: product engines ``M v`` (autograd HVP, finite differences); :mod:`.gauss_newton`:
  GGN products and the Gauss-Newton-Bartlett estimate; :mod:`.activation_reuse`: finite differences
  that start at the perturbed layer.
- :mod:`.estimators`: rowsum, Hutchinson and the exact diagonal from products; :func:`partial_hessian`.
- :mod:`.step`: the three ways a user drives an optimizer step, turned into gradients and an estimate.

The optimizer (:mod:`sgdph_tools.optim`) consumes estimates through :class:`StepCurvature`; nothing
here imports the optimizer.
"""

from .capabilities import ENGINES, ESTIMATORS, HESSIAN_ENGINES, PRODUCT_ESTIMATORS, Needs, check_choice, needs
from .estimators import estimate, partial_hessian, rademacher_like
from .gauss_newton import GGNVectorProduct, SubBatchGNB, gauss_newton_bartlett, ggn_vector_product
from .products import AutogradHVP, FiniteDifferenceHVP, Product, math_attention
from .replay import ClosureReplay, ForwardReplay, module_buffers_restored, rng_preserved
from .step import AmpScale, StepCurvature, StepGradients

__all__ = [
    "ENGINES",
    "ESTIMATORS",
    "HESSIAN_ENGINES",
    "PRODUCT_ESTIMATORS",
    "AmpScale",
    "AutogradHVP",
    "ClosureReplay",
    "FiniteDifferenceHVP",
    "ForwardReplay",
    "GGNVectorProduct",
    "Needs",
    "Product",
    "StepCurvature",
    "StepGradients",
    "SubBatchGNB",
    "check_choice",
    "estimate",
    "gauss_newton_bartlett",
    "ggn_vector_product",
    "math_attention",
    "module_buffers_restored",
    "needs",
    "partial_hessian",
    "rademacher_like",
    "rng_preserved",
]
