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


def test_find_classifier_falls_back_to_the_last_layer():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))
    assert find_classifier(model) is model[2]
    conv_head = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Conv2d(4, 3, 1), nn.AdaptiveAvgPool2d(1))
    assert find_classifier(conv_head) is conv_head[2]  # a 1x1 conv classifier, as SqueezeNet's
    headless = timm.create_model("resnet18", num_classes=0)  # head is an Identity
    assert find_classifier(headless) is None


@pytest.mark.parametrize(
    "name,kwargs,heads",
    [
        ("deit_tiny_distilled_patch16_224", {"img_size": 32, "depth": 1}, ["head", "head_dist"]),
        ("repvit_m1", {}, ["head.head.l", "head.head_dist.l"]),
        ("crossvit_tiny_240", {"img_size": 120}, ["head.0", "head.1"]),
        ("torchvision:squeezenet1_0", {}, ["classifier.1"]),
    ],
)
def test_every_head_bias_is_a_classifier_bias_and_its_row_sum_is_zero(name, kwargs, heads):
    from sgdph_tools import partial_hessian
    from sgdph_tools.models.factory import ModelSpec, create_model

    torch.manual_seed(0)
    model = create_model(ModelSpec.parse(name, num_classes=5, **kwargs)).eval()
    tags = tag_parameters(model)
    first_order_biases = [n for n, t in tags.items() if t.kind == BIAS and t.group == FIRST_ORDER]
    assert first_order_biases == [f"{h}.bias" for h in heads]
    if name.startswith("torchvision:squeezenet"):
        return  # its 1x1 conv classifier is followed by a ReLU: H·1 is near zero, not exactly zero
    # the independent truth: under softmax cross-entropy a bias added to the logits has H·1 = 0
    size = 120 if name.startswith("crossvit") else 32
    x, y = torch.randn(2, 3, size, size), torch.randint(0, 5, (2,))
    params = dict(model.named_parameters())

    def loss_fn():
        out = model(x)
        return torch.nn.functional.cross_entropy(torch.stack(out).mean(0) if isinstance(out, tuple) else out, y)

    rowsums = partial_hessian(loss_fn, [params[n] for n in first_order_biases], engine="autograd")
    assert all(r.abs().max() < 1e-5 for r in rowsums)


def test_gains_layer_scales_and_split_qkv_biases_are_tagged_by_role():
    tags = tag_parameters(timm.create_model("nf_resnet26", num_classes=5))
    assert (tags["stem.conv.gain"].kind, tags["stem.conv.gain"].group) == ("wn_gamma", SECOND_ORDER)
    beit = tag_parameters(timm.create_model("beit_base_patch16_224", num_classes=5, img_size=32, depth=1))
    assert (beit["blocks.0.gamma_1"].kind, beit["blocks.0.gamma_1"].group) == (LAYER_SCALE, SECOND_ORDER)
    assert (beit["blocks.0.attn.q_bias"].kind, beit["blocks.0.attn.v_bias"].group) == (BIAS, SECOND_ORDER)
    cait = tag_parameters(timm.create_model("cait_xxs24_224", num_classes=5, img_size=32, depth=1))
    assert {t.kind for n, t in cait.items() if "gamma_" in n} == {LAYER_SCALE}
    xcit = tag_parameters(timm.create_model("xcit_nano_12_p8_224", num_classes=5, img_size=32, depth=1))
    assert {xcit[f"blocks.0.gamma{i}"].kind for i in (1, 2, 3)} == {LAYER_SCALE}  # the zoo found them other_1d
    edgenext = tag_parameters(timm.create_model("edgenext_xx_small", num_classes=5))
    assert edgenext["stages.1.blocks.1.gamma_xca"].kind == LAYER_SCALE
