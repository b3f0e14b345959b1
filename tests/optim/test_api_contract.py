"""The Python API's promise (docs/training.md): a bad argument raises TypeError or ValueError with a
message that names the fix -- checked across the public entry points, not only the constructor."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

from sgdph_tools import SGDPH, sgdph_param_groups
from sgdph_tools.errors import UserError
from sgdph_tools.recipe import recipe_from_dict
from sgdph_tools.surgery.rewrite import convert
from tests.conftest import conv_bn_net


@pytest.mark.parametrize(
    "build, error, message",
    [
        (lambda net: SGDPH(net.parameters(), momentum=1.5), ValueError, r"momentum: 1.5 \(must be in \[0, 1\)\)"),
        (lambda net: SGDPH(net.parameters(), momentum=-0.1), ValueError, "momentum"),
        (lambda net: SGDPH([{"params": list(net.parameters()), "lr": -5}]), ValueError, "param group: invalid lr: -5"),
        (lambda net: SGDPH([{"params": list(net.parameters()), "eps": 0.0}]), ValueError, "param group: invalid eps"),
        (lambda net: SGDPH([{"lr": 0.1}]), ValueError, "has no 'params'"),
        (lambda net: SGDPH(net), TypeError, r"pass model.parameters\(\) or sgdph_param_groups\(model\)"),
        (lambda net: SGDPH(net.parameters(), lr="0.1"), TypeError, "lr must be a number"),
        (lambda net: SGDPH(net.parameters(), foreach="yes"), TypeError, "foreach must be True, False or None"),
        (lambda net: SGDPH(net.parameters(), seed=1.5), TypeError, "seed must be an integer"),
        (lambda net: SGDPH(net.parameters(), estimator="gnb", gnb_fraction=0.5), ValueError, "needs model="),
    ],
)
def test_bad_constructor_arguments(build, error, message):
    with pytest.raises(error, match=message):
        build(conv_bn_net())


def test_add_param_group_checks_a_group_made_by_sgdph_param_groups():
    net, extra = conv_bn_net(), nn.Linear(3, 3)
    opt = SGDPH(sgdph_param_groups(net))
    with pytest.raises(ValueError, match="param group: invalid momentum"):
        opt.add_param_group({**sgdph_param_groups(extra)[0], "momentum": 2.0})
    with pytest.raises(ValueError, match="param group is a dict with 'params'"):
        opt.add_param_group({"lr": 0.1})
    opt.add_param_group(sgdph_param_groups(extra)[0])  # a valid one goes in, with its state
    assert opt.param_groups[-1]["params"][0] is extra.bias or opt.param_groups[-1]["params"][0] is extra.weight


def test_recipe_errors_are_value_errors():
    with pytest.raises(ValueError, match="unknown recipe key 'optimizer.lrr'"):
        recipe_from_dict({"optimizer": {"lrr": 0.1}})
    assert issubclass(UserError, ValueError)


def test_convert_refuses_a_torchscript_module_and_an_exclude_that_matches_nothing():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated; users still hand us its modules
        scripted = torch.jit.script(net)
    with pytest.raises(TypeError, match="TorchScript module"):
        convert(scripted, wn=True, example_input=torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"--exclude '4\*' matches no conv/linear layer.*the layers: 0, 3"):
        convert(net, wn=True, exclude=["4*"], example_input=torch.randn(1, 3, 8, 8))
