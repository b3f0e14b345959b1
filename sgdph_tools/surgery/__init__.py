"""Model surgery: decouple conv/linear layers into weight-normalised direction, gamma and bias."""

from .graph import analyse
from .rewrite import ConversionReport, VerificationError, bake_model, convert, example_input_for, strip_norms
from .wn_layers import WNConv1d, WNConv2d, WNConv3d, WNLinear, bake, to_weight_norm, unconvertible_reason

__all__ = [
    "ConversionReport",
    "VerificationError",
    "WNConv1d",
    "WNConv2d",
    "WNConv3d",
    "WNLinear",
    "analyse",
    "bake",
    "bake_model",
    "convert",
    "example_input_for",
    "strip_norms",
    "to_weight_norm",
    "unconvertible_reason",
]
