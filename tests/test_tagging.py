from __future__ import annotations

from collections import Counter

import pytest
import timm
import torch
import torch.nn as nn

from sgdph_tools.tagging import (
    BIAS,
    FIRST_ORDER,
    LAYER_SCALE,
    NORM_BIAS,
    NORM_WEIGHT,
    OTHER_1D,
    SECOND_ORDER,
    WEIGHT,
    find_classifier,
    tag_parameters,
)


class LlamaRMSNorm(nn.Module):
    """A norm class from another library: known only by its name."""

    def __init__(self, dim):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class OddBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.temperature = nn.Parameter(torch.ones(4))  # 1-D, but not a known channel-wise role
        self.gamma = nn.Parameter(torch.ones(4))  # named like a layer scale

    def forward(self, x):
        return x * self.temperature * self.gamma


def test_kinds_by_module_type():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.GroupNorm(2, 4),
        nn.InstanceNorm2d(4, affine=True),
        nn.Flatten(),
        nn.Linear(4, 4),
        nn.LayerNorm(4),
        nn.RMSNorm(4),
        LlamaRMSNorm(4),
        OddBlock(),
        nn.PReLU(4),
        nn.Linear(4, 2),
    )
    tags = tag_parameters(model)
    kinds = {name: tag.kind for name, tag in tags.items()}
    assert kinds == {
        "0.weight": WEIGHT,
        "0.bias": BIAS,
        "1.weight": NORM_WEIGHT,
        "1.bias": NORM_BIAS,
        "2.weight": NORM_WEIGHT,
        "2.bias": NORM_BIAS,
        "3.weight": NORM_WEIGHT,
        "3.bias": NORM_BIAS,
        "5.weight": WEIGHT,
        "5.bias": BIAS,
        "6.weight": NORM_WEIGHT,
        "6.bias": NORM_BIAS,
        "7.weight": NORM_WEIGHT,
        "8.weight": NORM_WEIGHT,
        "9.temperature": OTHER_1D,
        "9.gamma": LAYER_SCALE,
        "10.weight": OTHER_1D,
        "11.weight": WEIGHT,
        "11.bias": BIAS,
    }
    assert "class name says Norm" in tags["8.weight"].reason
    groups = {name: tag.group for name, tag in tags.items()}
    assert groups["9.temperature"] == FIRST_ORDER  # not known to be channel-wise
    assert groups["10.weight"] == FIRST_ORDER
    assert groups["0.bias"] == groups["5.bias"] == groups["9.gamma"] == SECOND_ORDER
    assert groups["11.bias"] == FIRST_ORDER  # the classifier bias
    assert tags["11.bias"].reason.startswith("classifier bias")


def test_every_parameter_is_tagged_once_even_when_shared():
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    tags = tag_parameters(model)
    assert list(tags) == ["0.weight", "0.bias"]


@pytest.mark.parametrize(
    "name,kwargs,expected",
    [
        (
            "resnet18",
            {},
            {
                (WEIGHT, FIRST_ORDER): 21,
                (NORM_WEIGHT, SECOND_ORDER): 20,
                (NORM_BIAS, SECOND_ORDER): 20,
                (BIAS, FIRST_ORDER): 1,
            },
        ),
        (
            "convnext_atto",
            {},
            {
                (WEIGHT, FIRST_ORDER): 41,
                (BIAS, SECOND_ORDER): 40,
                (NORM_WEIGHT, SECOND_ORDER): 17,
                (NORM_BIAS, SECOND_ORDER): 17,
                (LAYER_SCALE, SECOND_ORDER): 12,
                (BIAS, FIRST_ORDER): 1,
            },
        ),
        (
            "vit_tiny_patch16_224",
            {"init_values": 1e-5, "depth": 2},
            {
                (WEIGHT, FIRST_ORDER): 12,
                (BIAS, SECOND_ORDER): 9,
                (NORM_WEIGHT, SECOND_ORDER): 5,
                (NORM_BIAS, SECOND_ORDER): 5,
                (LAYER_SCALE, SECOND_ORDER): 4,
                (BIAS, FIRST_ORDER): 1,
            },
        ),
    ],
)
def test_timm_models(name, kwargs, expected):
    model = timm.create_model(name, num_classes=10, **kwargs)
    tags = tag_parameters(model)
    assert set(tags) == {n for n, _ in model.named_parameters()}
    assert Counter((t.kind, t.group) for t in tags.values()) == expected
    head_bias = [n for n, t in tags.items() if t.kind == BIAS and t.group == FIRST_ORDER]
    classifier_name = next(n for n, m in model.named_modules() if m is model.get_classifier())
    assert head_bias == [f"{classifier_name}.bias"]


def test_find_classifier_falls_back_to_the_last_linear():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert find_classifier(model) is model[2]
    assert find_classifier(nn.Sequential(nn.Conv2d(1, 1, 1))) is None
    headless = timm.create_model("resnet18", num_classes=0)  # head is an Identity
    assert find_classifier(headless) is None
