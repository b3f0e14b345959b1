"""Parameter tagging: which parameters are channel-wise 1-D, and which optimizer path each takes.

``tag_parameters(model)`` names, for every parameter, its *kind* (what layer role it plays) and its
*group* (``second_order``: gets SGD-PH's Newton-type step by default; ``first_order``: plain SGDM).
Kinds are decided by the type of the module that owns the parameter; ``ndim == 1`` is only the
fallback for modules this project does not know.

One exception to "every channel-wise kind is second-order": the classifier's bias. Under softmax
cross-entropy the Hessian of the logits has rows that sum to zero (``diag(p) - p p^T``), so the
row-sum estimate ``H·1`` of the classifier bias is exactly zero; SGD-PH would then divide its
momentum by ``eps`` alone and take a step ``so_lr / eps`` (10x with the defaults) larger than SGD.
The authors' code avoids this by accident (its last 1-D tensor always gets an SGD step); here it is
a rule: the classifier bias is tagged ``bias`` but grouped ``first_order``.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import torch.nn as nn

from . import checks, module_kinds

# Parameter kinds.
NORM_WEIGHT = "norm_weight"  # gamma of BN/LN/GN/IN/RMSNorm and timm's norm classes
NORM_BIAS = "norm_bias"  # beta of the same
WN_GAMMA = "wn_gamma"  # per-output-channel gain of this project's weight-normalised conv/linear
BIAS = "bias"  # conv/linear bias
LAYER_SCALE = "layer_scale"  # per-channel residual scale (ConvNeXt, CaiT, ViT "ls")
OTHER_1D = "other_1d"  # a 1-D parameter of a module this project does not know
WEIGHT = "weight"  # everything else: conv/linear kernels, embeddings, tokens, ...

KINDS = (NORM_WEIGHT, NORM_BIAS, WN_GAMMA, BIAS, LAYER_SCALE, OTHER_1D, WEIGHT)

# The channel-wise 1-D kinds: second-order by default, as in the paper. OTHER_1D is not among them:
# a 1-D parameter of an unknown module is not known to be channel-wise (opt in by naming it).
CHANNELWISE_KINDS = (NORM_WEIGHT, NORM_BIAS, WN_GAMMA, BIAS, LAYER_SCALE)

SECOND_ORDER = "second_order"
FIRST_ORDER = "first_order"

# Fallbacks for unknown modules: a 1-D parameter named like a layer scale (BEiT/CaiT: gamma_1, gamma_2; XCiT:
# gamma1-3; EdgeNeXt: gamma_xca), or like a separate query/key/value bias (BEiT: q_bias, v_bias beside a bias-free qkv).
_LAYER_SCALE_NAME = re.compile(r"^(gamma(_?\d+|_[a-z]+)?|layer_scale\w*|ls\d*|scale)$")
_QKV_BIAS_NAME = re.compile(r"^[qkv]_bias$")


@dataclass(frozen=True)
class ParamTag:
    name: str
    kind: str
    group: str
    module_type: str
    shape: tuple[int, ...]
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


def find_classifiers(model: nn.Module) -> list[nn.Module]:
    """The layers that produce the logits. From timm's ``get_classifier()`` when there is one: every
    head it returns (distilled models return ``(head, head_dist)``, CrossViT a ``ModuleList`` of
    per-branch heads), and within a head every layer with the classifier's output size (RepViT's
    ``head`` holds ``head.l`` and ``head_dist.l``). Otherwise the last conv/linear layer in
    registration order -- a linear ``fc``, or SqueezeNet's 1x1 conv classifier."""
    heads: list[nn.Module] = []
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):  # the model names its head (an Identity when it has none: no fallback)
        try:
            head = get_classifier()
        except Exception:  # some models raise when the head was reset to Identity
            head = None
        if isinstance(head, (tuple, list, nn.ModuleList)):
            heads = [h for h in head if isinstance(h, nn.Module)]
        elif isinstance(head, nn.Module):
            heads = [head]
    found: list[nn.Module] = []
    for head in heads:
        layers = [m for m in head.modules() if _is_layer(m)]
        if layers:
            size = _out_size(layers[-1])
            found += [m for m in layers if _out_size(m) == size and m not in found]
    if found or callable(get_classifier):
        return found
    layers = [m for m in model.modules() if _is_layer(m)]
    return layers[-1:]


def find_classifier(model: nn.Module) -> nn.Module | None:
    """The first of :func:`find_classifiers` (the main head), or None."""
    found = find_classifiers(model)
    return found[0] if found else None


def _out_size(layer: nn.Module) -> int | None:
    return getattr(layer, "out_features", None) or getattr(layer, "out_channels", None)


def _is_layer(module: nn.Module) -> bool:
    return module_kinds.is_conv_or_linear(module) or module_kinds.is_weight_norm(module)


def _kind_of(module: nn.Module, local_name: str, ndim: int) -> tuple[str, str]:
    """(kind, reason) of the parameter ``local_name`` owned directly by ``module``."""
    type_name = type(module).__name__
    if module_kinds.is_weight_standardised(module) and local_name == "gain":
        return WN_GAMMA, f"per-output-channel gain of {type_name} (a weight-standardised conv)"
    if module_kinds.is_weight_norm(module):
        kinds = {"gamma": WN_GAMMA, "bias": BIAS, "direction": WEIGHT}
        return kinds.get(local_name, WEIGHT), f"{type_name}.{local_name}"
    if module_kinds.is_norm(module) and ndim == 1:
        how = "" if module_kinds.norm_is_by_type(module) else " (class name says Norm)"
        if local_name in ("weight", "gamma", "scale"):
            return NORM_WEIGHT, f"{type_name} affine scale{how}"
        if local_name in ("bias", "beta"):
            return NORM_BIAS, f"{type_name} affine shift{how}"
        return OTHER_1D, f"1-D parameter of {type_name}{how}"
    if module_kinds.is_conv_or_linear(module):
        if local_name == "bias":
            return BIAS, f"{type_name} bias"
        return WEIGHT, f"{type_name} {local_name}"
    if module_kinds.is_layer_scale(module) and ndim == 1:
        return LAYER_SCALE, f"{type_name}"
    if ndim == 1:
        if _LAYER_SCALE_NAME.match(local_name):
            return LAYER_SCALE, f"1-D '{local_name}' of {type_name} (name says layer scale)"
        if _QKV_BIAS_NAME.match(local_name):
            return BIAS, f"1-D '{local_name}' of {type_name} (a separate query/key/value bias)"
        return OTHER_1D, f"1-D parameter of {type_name}"
    return WEIGHT, f"{ndim}-D parameter of {type_name}"


def tag_parameters(model: nn.Module) -> dict[str, ParamTag]:
    """Tag every parameter of ``model`` (names as in ``model.named_parameters()``).

    Returns an ordered dict ``name -> ParamTag`` with ``kind`` (one of :data:`KINDS`) and ``group``
    (``second_order`` for the channel-wise 1-D kinds, ``first_order`` otherwise; the classifier bias
    is first-order, see the module docstring).
    """
    checks.module("model", model)
    classifiers = {id(m) for m in find_classifiers(model)}
    tags: dict[str, ParamTag] = {}
    seen: set[int] = set()  # shared parameters are tagged once, under their first name
    for module_name, module in model.named_modules():
        for local_name, param in module.named_parameters(recurse=False):
            if id(param) in seen:
                continue
            seen.add(id(param))
            name = f"{module_name}.{local_name}" if module_name else local_name
            kind, reason = _kind_of(module, local_name, param.ndim)
            group = SECOND_ORDER if kind in CHANNELWISE_KINDS else FIRST_ORDER
            if id(module) in classifiers and kind == BIAS:
                group = FIRST_ORDER
                reason = "classifier bias: its H·1 is exactly 0 under softmax cross-entropy"
            tags[name] = ParamTag(name, kind, group, type(module).__name__, tuple(param.shape), reason)
    return tags
