"""The CIFAR architectures of the paper's experiments, registered with timm.

- ``resnet18_cifar``, ``resnet50_cifar``: timm's ResNet with the usual CIFAR stem — one 3x3 stride-1
  conv, no max-pool — so 32x32 inputs keep a 4x4 map at the last stage.
- ``vgg11_cifar``, ``vgg19_cifar``: VGG with BatchNorm after every conv, global pooling and one
  linear classifier (the CIFAR VGG of the optimizer literature); ``vgg11_nobn``, ``vgg19_nobn``: the
  same without BatchNorm (convs with biases), the networks of the paper's Table 4.

``timm.create_model("vgg19_nobn", num_classes=100)`` builds them once ``sgdph_tools`` is imported.
"""

from __future__ import annotations

import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.resnet import BasicBlock, Bottleneck, ResNet

from ._classifier import PooledClassifier

__all__ = ["CifarVGG"]

_VGG_LAYERS = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def _cifar_cfg(**kwargs) -> dict:
    return {
        "url": "",
        "num_classes": 10,
        "input_size": (3, 32, 32),
        "pool_size": (1, 1),
        "mean": (0.4914, 0.4822, 0.4465),
        "std": (0.2470, 0.2435, 0.2616),
        **kwargs,
    }


_RESNET_CFG = _cifar_cfg(first_conv="conv1", classifier="fc", pool_size=(4, 4))
default_cfgs = generate_default_cfgs(
    {
        "resnet18_cifar.untrained": _RESNET_CFG,
        "resnet50_cifar.untrained": _RESNET_CFG,
        "vgg11_cifar.untrained": _cifar_cfg(first_conv="features.0", classifier="fc"),
        "vgg19_cifar.untrained": _cifar_cfg(first_conv="features.0", classifier="fc"),
        "vgg11_nobn.untrained": _cifar_cfg(first_conv="features.0", classifier="fc"),
        "vgg19_nobn.untrained": _cifar_cfg(first_conv="features.0", classifier="fc"),
    }
)


class CifarVGG(PooledClassifier):
    """VGG for 32x32 inputs: conv3x3(-BN)-ReLU stages with max-pooling, global average pooling,
    dropout and a linear classifier on the 512 features. Follows timm's classifier interface."""

    def __init__(
        self,
        depth: int = 19,
        batch_norm: bool = True,
        num_classes: int = 10,
        in_chans: int = 3,
        drop_rate: float = 0.0,
        global_pool: str = "avg",
    ):
        super().__init__()
        if depth not in _VGG_LAYERS:
            raise ValueError(f"VGG depth {depth} not supported; choose from {sorted(_VGG_LAYERS)}")
        layers: list[nn.Module] = []
        chans = in_chans
        for v in _VGG_LAYERS[depth]:
            if v == "M":
                layers.append(nn.MaxPool2d(2, 2))
                continue
            layers.append(nn.Conv2d(chans, v, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(v))
            layers.append(nn.ReLU(inplace=True))
            chans = v
        self.features = nn.Sequential(*layers)
        self._init_head(chans, num_classes, drop_rate)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)


def _cifar_resnet(variant: str, pretrained: bool, **kwargs) -> ResNet:
    model = build_model_with_cfg(ResNet, variant, pretrained, **kwargs)
    # The CIFAR stem: 3x3 stride-1 conv, no max-pool (the ImageNet stem would shrink 32x32 to 8x8).
    model.conv1 = nn.Conv2d(kwargs.get("in_chans", 3), model.conv1.out_channels, 3, 1, 1, bias=False)
    model.maxpool = nn.Identity()
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    return model


@register_model
def resnet18_cifar(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-18 with a 3x3 stride-1 stem and no max-pool, for 32x32 images."""
    return _cifar_resnet("resnet18_cifar", pretrained, block=BasicBlock, layers=(2, 2, 2, 2), **kwargs)


@register_model
def resnet50_cifar(pretrained: bool = False, **kwargs) -> ResNet:
    """ResNet-50 with a 3x3 stride-1 stem and no max-pool, for 32x32 images."""
    return _cifar_resnet("resnet50_cifar", pretrained, block=Bottleneck, layers=(3, 4, 6, 3), **kwargs)


def _vgg(variant: str, pretrained: bool, depth: int, batch_norm: bool, **kwargs) -> CifarVGG:
    return build_model_with_cfg(CifarVGG, variant, pretrained, depth=depth, batch_norm=batch_norm, **kwargs)


@register_model
def vgg11_cifar(pretrained: bool = False, **kwargs) -> CifarVGG:
    """VGG-11 with BatchNorm for 32x32 images."""
    return _vgg("vgg11_cifar", pretrained, 11, True, **kwargs)


@register_model
def vgg19_cifar(pretrained: bool = False, **kwargs) -> CifarVGG:
    """VGG-19 with BatchNorm for 32x32 images."""
    return _vgg("vgg19_cifar", pretrained, 19, True, **kwargs)


@register_model
def vgg11_nobn(pretrained: bool = False, **kwargs) -> CifarVGG:
    """VGG-11 without normalisation layers (convs with biases), for 32x32 images."""
    return _vgg("vgg11_nobn", pretrained, 11, False, **kwargs)


@register_model
def vgg19_nobn(pretrained: bool = False, **kwargs) -> CifarVGG:
    """VGG-19 without normalisation layers (convs with biases), for 32x32 images (paper, Table 4)."""
    return _vgg("vgg19_nobn", pretrained, 19, False, **kwargs)
