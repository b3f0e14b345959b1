from __future__ import annotations

import pytest
import timm
import torch.nn as nn

from sgdph_tools import sgdph_param_groups
from sgdph_tools.tagging import CHANNELWISE_KINDS
from tests.conftest import conv_bn_net


def test_tag_based_groups_keep_the_classifier_bias_first_order():
    net = conv_bn_net()
    groups = sgdph_param_groups(net)
    assert [g["second_order"] for g in groups] == [True, False]
    assert groups[0]["param_names"] == ["1.weight", "1.bias", "4.weight", "4.bias"]
    assert "9.bias" in groups[1]["param_names"]
    norm_only = sgdph_param_groups(net, second_order_kinds=["norm_weight"])
    assert norm_only[0]["param_names"] == ["1.weight", "4.weight"]
    with pytest.raises(ValueError, match="unknown parameter kind"):
        sgdph_param_groups(net, second_order_kinds=["norm_wieght"])


def test_opting_in_unknown_1d_params():
    model = nn.Sequential(nn.Linear(3, 3), nn.PReLU(3), nn.Linear(3, 2))
    default = sgdph_param_groups(model)
    assert default[0]["param_names"] == ["0.bias"]
    opted = sgdph_param_groups(model, second_order_kinds=(*CHANNELWISE_KINDS, "other_1d"))
    assert opted[0]["param_names"] == ["0.bias", "1.weight"]


def test_frozen_params_are_left_out_unless_asked():
    net = conv_bn_net()
    net[1].weight.requires_grad_(False)
    assert "1.weight" not in sgdph_param_groups(net)[0]["param_names"]
    assert "1.weight" in sgdph_param_groups(net, include_frozen=True)[0]["param_names"]


def test_groups_for_a_timm_model_cover_every_parameter_once():
    model = timm.create_model("convnext_atto", num_classes=5)
    groups = sgdph_param_groups(model)
    names = [n for g in groups for n in g["param_names"]]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert "head.fc.bias" in groups[1]["param_names"]  # the classifier bias
