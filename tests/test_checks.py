"""The public Python API checks its arguments: a wrong type or shape is a TypeError/ValueError that
names the argument and the fix, never a silent wrong result (``partial_hessian(fn, tensor)`` once
returned zeros: iterating a bare tensor walks its elements)."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

from sgdph_tools import (
    SGDPH,
    gauss_newton_bartlett,
    ggn_vector_product,
    partial_hessian,
    sgdph_param_groups,
    tag_parameters,
)
from sgdph_tools.models.factory import ModelSpec
from sgdph_tools.recipe import load_recipe, recipe_from_dict
from sgdph_tools.surgery.checkpoint import load_model
from sgdph_tools.surgery.export import export_plain
from sgdph_tools.surgery.rewrite import convert
from tests.conftest import conv_bn_net


@pytest.fixture
def setup():
    torch.manual_seed(0)
    net = conv_bn_net()
    x, y = torch.randn(4, 2, 6, 6), torch.randint(0, 3, (4,))
    gamma = net[1].weight
    return net, x, y, gamma


def test_partial_hessian(setup):
    net, x, y, gamma = setup

    def loss_fn():
        return F.cross_entropy(net(x), y)

    cases = [
        ((loss_fn, gamma), TypeError, r"params must be a list of tensors, not one tensor: pass \[params\]"),
        ((loss_fn, [gamma, "beta"]), TypeError, r"params\[1\] must be a tensor, got str"),
        ((loss_fn, [gamma.detach()]), ValueError, r"params\[0\] must have requires_grad=True"),
        ((F.cross_entropy(net(x), y), [gamma]), TypeError, "loss_fn must be a function that runs the forward pass"),
        ((loss_fn, [gamma], "rowsum", "autograd", 0), TypeError, "generator must be a torch.Generator"),
        ((loss_fn, [gamma], "rowsun"), ValueError, "unknown estimator"),
    ]
    for args, error, message in cases:
        with pytest.raises(error, match=message):
            partial_hessian(*args)
    assert partial_hessian(loss_fn, [gamma])[0].shape == gamma.shape  # the right call works


def test_gauss_newton_functions(setup):
    net, x, y, gamma = setup
    logits = net(x)
    with pytest.raises(TypeError, match="not one tensor"):
        gauss_newton_bartlett(logits, gamma)
    with pytest.raises(ValueError, match=r"logits must be a \[batch, classes\] tensor"):
        gauss_newton_bartlett(logits[0], [gamma])
    with pytest.raises(TypeError, match=r"vectors must be a list of tensors, not one tensor"):
        ggn_vector_product(logits, [gamma], torch.ones_like(gamma))
    with pytest.raises(ValueError, match=r"vectors must have one tensor per entry of params \(1\), got 2"):
        ggn_vector_product(logits, [gamma], [torch.ones_like(gamma)] * 2)
    with pytest.raises(ValueError, match=r"vectors\[0\] must have the shape of params\[0\], \(4,\); got \(3,\)"):
        ggn_vector_product(logits, [gamma], [torch.ones(3)])


def test_optimizer_and_param_groups(setup):
    net, _, _, gamma = setup
    with pytest.raises(TypeError, match="not one tensor: pass"):
        SGDPH(gamma)
    with pytest.raises(TypeError, match=r"lr must be a number, got '0.1'"):
        SGDPH(net.parameters(), lr="0.1")
    with pytest.raises(TypeError, match="so_lr must be a number"):
        SGDPH(net.parameters(), so_lr="0.1")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        SGDPH(net.parameters(), model=lambda x: x)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        sgdph_param_groups(net.parameters())
    with pytest.raises(
        TypeError, match=r"second_order_kinds must be a list of strings, not one string: pass \['norm_weight'\]"
    ):
        sgdph_param_groups(net, "norm_weight")
    with pytest.raises(ValueError, match="unknown parameter kind"):
        sgdph_param_groups(net, ["norm_wieght"])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        tag_parameters({"w": gamma})


def test_surgery(setup):
    model = timm.create_model("small_cnn_nobn", num_classes=3, in_chans=1)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        convert(model.state_dict())
    with pytest.raises(TypeError, match=r"exclude must be a list of strings, not one string: pass \['fc'\]"):
        convert(model, exclude="fc")
    with pytest.raises(TypeError, match="example_input must be a tensor"):
        convert(model, example_input=[1, 2])
    converted, _ = convert(model)
    with pytest.raises(TypeError, match=r"spec must be a ModelSpec \(ModelSpec.parse"):
        export_plain(converted, "small_cnn_nobn")
    export_plain(converted, ModelSpec.parse("small_cnn_nobn", num_classes=3, in_chans=1))
    with pytest.raises(TypeError, match="source must be a checkpoint path or a model name"):
        load_model(model)


def test_recipe_loading(tmp_path):
    with pytest.raises(TypeError, match=r"overrides must be a list of 'section.key=value' strings, not one string"):
        recipe_from_dict({}, "optimizer.lr=0.1")
    with pytest.raises(TypeError, match="each override must be a 'section.key=value' string, got float"):
        recipe_from_dict({}, [0.1])
    with pytest.raises(TypeError, match="data must be a dict of recipe sections"):
        recipe_from_dict(["model"])
    with pytest.raises(TypeError, match="path must be a recipe file's path"):
        load_recipe({"model": {}})
