"""What kind of layer a module is: normalisation, conv/linear, layer scale.

One place answers these questions for the whole project: parameter tagging asks them to name a
parameter's kind, and the graph analysis asks them to decide whether a conv feeds a norm.
Decisions go by module type first (torch's and timm's classes); a class name that says "Norm" is
the fallback for norm classes from other libraries (e.g. a model's own ``LlamaRMSNorm``).
"""

from __future__ import annotations

import torch.nn as nn


def _timm_classes(*names: str) -> tuple[type, ...]:
    """The named classes from ``timm.layers`` that this timm version has (older ones lack some)."""
    try:
        import timm.layers as layers
    except ImportError:  # timm is a dependency, but keep this module importable without it
        return ()
    return tuple(getattr(layers, n) for n in names if isinstance(getattr(layers, n, None), type))


# Normalisation layers whose affine parameters are channel-wise 1-D vectors. torch's BatchNorm and
# InstanceNorm share _NormBase; timm's BatchNormAct2d, LayerNorm2d, GroupNorm1, ... subclass
# torch's classes, so only timm's own roots need listing.
_TORCH_NORMS: tuple[type, ...] = (
    nn.modules.batchnorm._NormBase,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())

_TIMM_NORMS: tuple[type, ...] = _timm_classes(
    "RmsNorm",
    "RmsNormFp32",
    "RmsNorm2d",
    "RmsNorm2dFp32",
    "SimpleNorm",
    "SimpleNormFp32",
    "SimpleNorm2d",
    "SimpleNorm2dFp32",
    "FrozenBatchNormAct2d",
    "FrozenBatchNorm2d",
    "EvoNorm2dB0",
    "EvoNorm2dB1",
    "EvoNorm2dB2",
    "EvoNorm2dS0",
    "EvoNorm2dS1",
    "EvoNorm2dS2",
    "FilterResponseNormTlu2d",
    "FilterResponseNormAct2d",
    "GlobalResponseNorm",
)

NORM_TYPES: tuple[type, ...] = _TORCH_NORMS + _TIMM_NORMS

# Norms that remove each channel's own scale, so that a layer feeding one has a redundant per-channel
# scale ("already normalised"): BatchNorm and InstanceNorm, GroupNorm with one channel per group, and
# timm's FilterResponseNorm (x / sqrt(mean over space of x^2)). LayerNorm over channels and RMSNorm
# remove only a common scale, GroupNorm one per group, LocalResponseNorm neither.
_FILTER_RESPONSE_NORMS: tuple[type, ...] = _timm_classes("FilterResponseNormTlu2d", "FilterResponseNormAct2d")


def removes_channel_scale(module: nn.Module) -> bool:
    """A norm layer that removes each channel's scale (see above)."""
    if isinstance(module, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return True
    if isinstance(module, _FILTER_RESPONSE_NORMS):
        return True
    return isinstance(module, nn.GroupNorm) and module.num_groups == module.num_channels


# Per-channel learnable scales on a residual branch (CaiT/ConvNeXt/ViT "layer scale").
LAYER_SCALE_TYPES: tuple[type, ...] = _timm_classes("LayerScale", "LayerScale2d")

# Convolutions and linear layers: their bias is a channel-wise 1-D parameter, their weight is not.
CONV_LINEAR_TYPES: tuple[type, ...] = (nn.modules.conv._ConvNd, nn.Linear)

# Convolutions that standardise their own weight (weight standardisation): they already carry a
# normalisation, so the surgery pass leaves them alone.
WEIGHT_STANDARDISED_TYPES: tuple[type, ...] = _timm_classes(
    "StdConv2d", "StdConv2dSame", "ScaledStdConv2d", "ScaledStdConv2dSame"
)


def is_norm(module: nn.Module) -> bool:
    """True for a normalisation layer, by type, or by a class name containing 'Norm' as a fallback."""
    if isinstance(module, NORM_TYPES):
        return True
    name = type(module).__name__
    # "Norm" in the name but not a composite block that merely contains a norm (ConvNormAct, ...).
    return "Norm" in name and not name.startswith(("Conv", "SeparableConv")) and _is_leaf(module)


def norm_is_by_type(module: nn.Module) -> bool:
    """True when :func:`is_norm` recognised the module by its type rather than by its class name."""
    return isinstance(module, NORM_TYPES)


def is_conv_or_linear(module: nn.Module) -> bool:
    return isinstance(module, CONV_LINEAR_TYPES)


def is_layer_scale(module: nn.Module) -> bool:
    return isinstance(module, LAYER_SCALE_TYPES)


def is_weight_norm(module: nn.Module) -> bool:
    """True for this project's weight-normalised conv/linear layers (they set the class attribute
    ``is_sgdph_weight_norm``; checked by attribute so this module need not import the surgery code)."""
    return bool(getattr(type(module), "is_sgdph_weight_norm", False))


def is_weight_standardised(module: nn.Module) -> bool:
    return isinstance(module, WEIGHT_STANDARDISED_TYPES)


def _is_leaf(module: nn.Module) -> bool:
    """A module without submodules that own parameters (a norm layer, not a block holding one)."""
    return not any(True for child in module.children() if any(True for _ in child.parameters()))
