from __future__ import annotations

import pytest
import timm
import torch

import sgdph_tools  # noqa: F401
from sgdph_tools.models import REGISTERED
from sgdph_tools.tagging import NORM_WEIGHT, tag_parameters


@pytest.mark.parametrize("name", REGISTERED)
def test_registered_with_timm(name):
    assert timm.is_model(name)
    model = timm.create_model(name, num_classes=7, in_chans=1 if name == "small_cnn" else 3).eval()
    size = model.pretrained_cfg["input_size"]
    with torch.no_grad():
        assert model(torch.randn(2, *size)).shape == (2, 7)
    assert model.get_classifier().out_features == 7
    model.reset_classifier(3)
    with torch.no_grad():
        assert model(torch.randn(1, *size)).shape == (1, 3)
    with pytest.raises(RuntimeError, match="No pretrained weights"):
        timm.create_model(name, pretrained=True)


def test_cifar_architectures():
    resnet = timm.create_model("resnet18_cifar")
    assert resnet.conv1.kernel_size == (3, 3) and resnet.conv1.stride == (1, 1)
    assert isinstance(resnet.maxpool, torch.nn.Identity)
    assert resnet.forward_features(torch.randn(1, 3, 32, 32)).shape == (1, 512, 4, 4)  # 4x4 at the end
    assert timm.create_model("resnet50_cifar").num_features == 2048
    with_bn, without = timm.create_model("vgg19_cifar"), timm.create_model("vgg19_nobn")
    convs = [m for m in without.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 16 and all(c.bias is not None for c in convs)
    assert sum(t.kind == NORM_WEIGHT for t in tag_parameters(with_bn).values()) == 16
    assert not any(t.kind == NORM_WEIGHT for t in tag_parameters(without).values())
    assert len([m for m in timm.create_model("vgg11_nobn").modules() if isinstance(m, torch.nn.Conv2d)]) == 8


def test_the_small_net_without_batchnorm_has_biased_convs_and_converts():
    from sgdph_tools.surgery.rewrite import convert, example_input_for

    net = timm.create_model("small_cnn_nobn")
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 3 and all(c.bias is not None for c in convs)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    converted, report = convert(net, wn=True, example_input=example_input_for(net, 32))
    assert len(report.decoupled) == 4  # three convs and the classifier
