"""Weight-normalised conv/linear layers: ``W_i = gamma_i · V_i / ||V_i||`` per output channel i.

Each layer owns ``direction`` (V, the old weight's shape), ``gamma`` (1-D, one per output channel) and
``bias`` (1-D, the old layer's; a layer without one gets none unless ``add_bias``, which adds zeros --
capacity the original architecture cannot hold once trained) — plain parameters with plain names, so they pickle,
load by state_dict and are tagged ``weight`` / ``wn_gamma`` / ``bias``. ``to_weight_norm`` builds one from
an ``nn.Conv1d/2d/3d`` (grouped and depthwise included) or ``nn.Linear`` with identical outputs
(gamma = the per-channel norm of the old weight); ``bake`` folds it back into the plain layer.

PyTorch's own ``weight_norm`` parametrization keeps g with shape (out, 1, 1, 1), makes
``torch.save(model)`` fail and is tagged by an awkward name; hence these small modules.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["WNConv1d", "WNConv2d", "WNConv3d", "WNLinear", "to_weight_norm", "bake", "unconvertible_reason"]


class _WeightNorm(nn.Module):
    """Common part: the parameters, the normalised weight, and the way back to a plain layer."""

    is_sgdph_weight_norm = True  # recognised by sgdph_tools.module_kinds.is_weight_norm
    plain_type: type[nn.Module]

    def _init_params(self, weight: torch.Tensor, bias: torch.Tensor | None, add_bias: bool) -> None:
        w = weight.detach()
        self.direction = nn.Parameter(w.clone())
        self.gamma = nn.Parameter(_channel_norms(w))
        if bias is not None:
            self.bias = nn.Parameter(bias.detach().clone())
        elif add_bias:
            self.bias = nn.Parameter(w.new_zeros(w.shape[0]))
        else:
            self.register_parameter("bias", None)

    @property
    def weight(self) -> torch.Tensor:
        """The effective weight gamma · V / ||V||: lets code that reads ``layer.weight`` keep working
        (e.g. ``nn.MultiheadAttention`` reading ``out_proj.weight``)."""
        shape = (-1,) + (1,) * (self.direction.ndim - 1)
        return self.direction * (self.gamma / _channel_norms(self.direction)).view(shape)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, weight-normalised"

    def bake(self) -> nn.Module:
        """The equivalent plain layer (``nn.Conv*``/``nn.Linear``), with a bias if this one has one."""
        raise NotImplementedError


def _channel_norms(weight: torch.Tensor) -> torch.Tensor:
    """L2 norm of each output channel (dim 0) of a conv/linear weight."""
    return weight.flatten(1).norm(dim=1)


class _WNConvNd(_WeightNorm):
    _conv = staticmethod(F.conv2d)

    def __init__(self, conv: nn.modules.conv._ConvNd, add_bias: bool = False):
        super().__init__()
        for attr in (
            "in_channels",
            "out_channels",
            "kernel_size",
            "stride",
            "padding",
            "dilation",
            "groups",
            "padding_mode",
            "_reversed_padding_repeated_twice",
        ):
            setattr(self, attr, getattr(conv, attr))
        self._init_params(conv.weight, conv.bias, add_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The same computation as nn.ConvNd._conv_forward, with the normalised weight.
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return self._conv(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return self._conv(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, groups={self.groups}, weight-normalised"
        )

    def bake(self) -> nn.Module:
        conv = self.plain_type(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=self.bias is not None,
            padding_mode=self.padding_mode,
            device=self.direction.device,
            dtype=self.direction.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(self.weight)
            if self.bias is not None:
                conv.bias.copy_(self.bias)
        return conv


class WNConv1d(_WNConvNd):
    plain_type = nn.Conv1d
    _conv = staticmethod(F.conv1d)


class WNConv2d(_WNConvNd):
    plain_type = nn.Conv2d
    _conv = staticmethod(F.conv2d)


class WNConv3d(_WNConvNd):
    plain_type = nn.Conv3d
    _conv = staticmethod(F.conv3d)


class WNLinear(_WeightNorm):
    plain_type = nn.Linear

    def __init__(self, linear: nn.Linear, add_bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self._init_params(linear.weight, linear.bias, add_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, weight-normalised"

    def bake(self) -> nn.Module:
        linear = nn.Linear(
            self.in_features,
            self.out_features,
            bias=self.bias is not None,
            device=self.direction.device,
            dtype=self.direction.dtype,
        )
        with torch.no_grad():
            linear.weight.copy_(self.weight)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear


_WN_FOR = {nn.Conv1d: WNConv1d, nn.Conv2d: WNConv2d, nn.Conv3d: WNConv3d, nn.Linear: WNLinear}


def _equivalent_subclasses() -> tuple[type, ...]:
    """Subclasses that override forward but compute the same thing outside TorchScript."""
    try:
        from timm.layers import Linear as TimmLinear  # casts dtypes only when scripting
    except ImportError:
        return ()
    return (TimmLinear,)


_EQUIVALENT = _equivalent_subclasses()


def _plain_base(module: nn.Module) -> type[nn.Module] | None:
    """The torch class whose computation ``module`` performs: its own class, a subclass that keeps
    the base class's forward (e.g. torch's NonDynamicallyQuantizableLinear), or a known equivalent."""
    for base in _WN_FOR:
        if isinstance(module, base):
            if type(module) in _EQUIVALENT:
                return base
            same_forward = type(module).forward is base.forward
            same_conv = getattr(type(module), "_conv_forward", None) is getattr(base, "_conv_forward", None)
            return base if same_forward and same_conv else None
    return None


def unconvertible_reason(module: nn.Module) -> str | None:
    """Why ``module`` cannot be decoupled (None when it can)."""
    if isinstance(module, _WeightNorm):
        return "already weight-normalised"
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return f"{type(module).__name__}: transposed convolutions keep output channels on dim 1; not supported"
    if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
        return f"{type(module).__name__} is not a conv/linear layer"
    if _plain_base(module) is None:
        return f"{type(module).__name__} overrides the conv/linear forward; decoupling would change what it computes"
    if getattr(module, "weight", None) is None or not isinstance(module.weight, torch.Tensor):
        return "no weight tensor"
    if module.weight.is_meta:
        return "weights on the meta device"
    zero = (_channel_norms(module.weight.detach()) == 0).nonzero().flatten().tolist()
    if zero:
        shown = ", ".join(map(str, zero[:5])) + (", ..." if len(zero) > 5 else "")
        return f"output channel(s) {shown} have zero weight norm: the direction V/||V|| is undefined"
    return None


def to_weight_norm(module: nn.Module, add_bias: bool = False) -> _WeightNorm:
    """The weight-normalised twin of a conv/linear layer (same outputs up to float rounding);
    ``add_bias``: a zero bias where the layer has none."""
    reason = unconvertible_reason(module)
    if reason is not None:
        raise ValueError(f"cannot decouple {type(module).__name__}: {reason}")
    return _WN_FOR[_plain_base(module)](module, add_bias)


def bake(module: nn.Module) -> nn.Module:
    """The plain layer for a weight-normalised one (identity for anything else)."""
    return module.bake() if isinstance(module, _WeightNorm) else module
