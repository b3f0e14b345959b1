"""A small conv-BN network for tiny images (scikit-learn's 8x8 digits, generated shapes, smoke
tests), and the same network without BatchNorm (the paper's weight-normalisation setting in miniature:
``sgdph convert small_cnn_nobn --wn``).

Registered with timm, so ``timm.create_model("small_cnn", num_classes=10, in_chans=1)`` builds it.
It follows timm's classifier interface (see ``_classifier.py``).
"""

from __future__ import annotations

import torch.nn as nn
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model

from ._classifier import PooledClassifier

__all__ = ["SmallCNN"]


def _conv_bn_relu(in_chs: int, out_chs: int, stride: int, norm: bool = True) -> nn.Sequential:
    if not norm:  # the conv keeps its bias where no BatchNorm follows
        return nn.Sequential(nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1), nn.ReLU(inplace=True))
    return nn.Sequential(
        nn.Conv2d(in_chs, out_chs, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_chs),
        nn.ReLU(inplace=True),
    )


class SmallCNN(PooledClassifier):
    """``stages`` conv-BN-ReLU stages (width, 2·width, 4·width, ...; all but the first with stride 2,
    the first with ``stem_stride``), global average pooling and a linear classifier; ``norm=False``:
    conv-ReLU stages (biased convs). The default (3 stages, stem stride 1) sees 9x9 pixels per
    output position -- enough for 8x8 digits; 32x32 images of whole shapes want ``stages=4,
    stem_stride=2`` (31x31 pixels)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_chans: int = 3,
        width: int = 32,
        drop_rate: float = 0.0,
        norm: bool = True,
        stages: int = 3,
        stem_stride: int = 1,
    ):
        super().__init__()
        if stages < 1 or stem_stride < 1:
            raise ValueError(f"SmallCNN needs stages >= 1 and stem_stride >= 1 (got {stages}, {stem_stride})")
        widths = [width * 2**i for i in range(stages)]
        self.features = nn.Sequential(
            _conv_bn_relu(in_chans, width, stem_stride, norm),
            *(_conv_bn_relu(c_in, c_out, 2, norm) for c_in, c_out in zip(widths, widths[1:])),
        )
        self._init_head(widths[-1], num_classes, drop_rate)


default_cfgs = generate_default_cfgs(
    {
        "small_cnn.untrained": {
            "url": "",
            "num_classes": 10,
            "input_size": (1, 8, 8),
            "pool_size": (2, 2),
            "mean": (0.5,),
            "std": (0.5,),
            "first_conv": "features.0.0",
            "classifier": "fc",
        },
        "small_cnn_nobn.untrained": {
            "url": "",
            "num_classes": 10,
            "input_size": (3, 32, 32),
            "pool_size": (8, 8),
            "mean": (0.5, 0.5, 0.5),
            "std": (0.3, 0.3, 0.3),
            "first_conv": "features.0.0",
            "classifier": "fc",
        },
    }
)


@register_model
def small_cnn(pretrained: bool = False, **kwargs) -> SmallCNN:
    """Small conv-BN-ReLU net (32-64-128 channels) for 8x8..32x32 inputs; no pretrained weights."""
    return build_model_with_cfg(SmallCNN, "small_cnn", pretrained, **kwargs)


@register_model
def small_cnn_nobn(pretrained: bool = False, **kwargs) -> SmallCNN:
    """The small net without BatchNorm (conv-ReLU, biased convs); no pretrained weights."""
    return build_model_with_cfg(SmallCNN, "small_cnn_nobn", pretrained, norm=False, **kwargs)
