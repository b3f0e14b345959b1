"""The SGD-PH optimizer, its param-group helper, and its registration with timm's optimizer factory."""

from .param_groups import SELECTABLE_KINDS, sgdph_param_groups
from .sgdph import SGDPH
from .timm_registry import register_with_timm

__all__ = ["SGDPH", "sgdph_param_groups", "SELECTABLE_KINDS", "register_with_timm"]
