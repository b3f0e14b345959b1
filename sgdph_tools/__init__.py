"""sgdph-tools: SGD with Partial Hessian (SGD-PH) for PyTorch and timm.

Importing the package registers the ``sgdph`` optimizer with timm's optimizer factory and this
project's models (``resnet18_cifar``, ``vgg19_nobn``, ``small_cnn``, ...) with timm's model registry.
"""

from . import models  # noqa: F401  (registers the models with timm)
from .curvature import gauss_newton_bartlett, ggn_vector_product, partial_hessian
from .optim import SGDPH, BlockHessianFree, register_with_timm, sgdph_param_groups
from .tagging import ParamTag, tag_parameters
from .version import __version__

register_with_timm()

__all__ = [
    "SGDPH",
    "BlockHessianFree",
    "ParamTag",
    "gauss_newton_bartlett",
    "ggn_vector_product",
    "partial_hessian",
    "sgdph_param_groups",
    "tag_parameters",
    "__version__",
]
