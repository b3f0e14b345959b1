"""The SGD-PH optimizer, its param-group helper, its registration with timm's optimizer factory, and the
block-diagonal Hessian-free baseline."""

from .block_hf import BlockHessianFree
from .param_groups import SELECTABLE_KINDS, sgdph_param_groups
from .sgdph import SGDPH
from .timm_registry import register_with_timm

__all__ = ["SGDPH", "BlockHessianFree", "sgdph_param_groups", "SELECTABLE_KINDS", "register_with_timm"]
