"""``timm.optim.create_optimizer_v2(model, opt="sgdph")`` once sgdph_tools is imported."""
from __future__ import annotations

import timm
import timm.optim
import torch.nn.functional as F

import sgdph_tools  # noqa: F401  (registers the optimizers)
from sgdph_tools import SGDPH, sgdph_param_groups
from tests.conftest import batch_for, conv_bn_net


def test_create_optimizer_v2_builds_sgdph_with_timm_groups():
    net = conv_bn_net()
    opt = timm.optim.create_optimizer_v2(net, opt="sgdph", lr=0.01, weight_decay=5e-3, so_lr=2e-3)
    assert isinstance(opt, SGDPH) and opt.is_second_order
    assert timm.optim.get_optimizer_info("sgdph").second_order
    # timm's no-decay group (all 1-D params) is split by the authors' rule: last 1-D first-order.
    flags = [(g["second_order"], g["weight_decay"], len(g["params"])) for g in opt.param_groups]
    assert flags == [(True, 0.0, 4), (False, 0.0, 1), (False, 5e-3, 3)]
    assert all(g["so_lr"] == 2e-3 and g["momentum"] == 0.9 for g in opt.param_groups)
    x, y = batch_for(net)
    F.cross_entropy(net(x), y).backward(create_graph=opt.is_second_order)  # timm train.py's call
    opt.step()


def test_param_group_fn_and_finite_difference_variant():
    net = conv_bn_net()
    opt = timm.optim.create_optimizer_v2(net, opt="sgdphfd", lr=0.01, param_group_fn=sgdph_param_groups)
    assert opt.engine == "finite_difference" and not opt.is_second_order
    assert [g["second_order"] for g in opt.param_groups] == [True, False]
    x, y = batch_for(net)
    opt.step(loss_fn=lambda: F.cross_entropy(net(x), y))
    assert "sgdph" in timm.optim.list_optimizers() and "sgdphfd" in timm.optim.list_optimizers()
