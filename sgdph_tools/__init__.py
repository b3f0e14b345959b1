"""sgdph-tools: SGD with Partial Hessian (SGD-PH) for PyTorch and timm.

Importing the package registers the ``sgdph`` optimizer with timm's optimizer factory and this
project's models (``resnet18_cifar``, ``vgg19_nobn``, ``small_cnn``, ...) with timm's model registry.
"""

from importlib.metadata import PackageNotFoundError, version

from . import models  # noqa: F401  (registers the models with timm)
from .gauss_newton import gauss_newton_bartlett, ggn_vector_product
from .hessian import partial_hessian
from .optim import SGDPH, register_with_timm, sgdph_param_groups
from .tagging import ParamTag, tag_parameters

try:
    __version__ = version("sgdph-tools")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

register_with_timm()

__all__ = [
    "SGDPH",
    "ParamTag",
    "gauss_newton_bartlett",
    "ggn_vector_product",
    "partial_hessian",
    "sgdph_param_groups",
    "tag_parameters",
    "__version__",
]
