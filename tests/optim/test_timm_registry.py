"""Every name registered with timm's factory trains in timm's own loop: ``train.py`` calls
``loss.backward(create_graph=second_order)`` (or ``NativeScaler`` with it) and ``optimizer.step()``."""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import timm.optim
import torch
import torch.nn.functional as F
from timm.utils import NativeScaler, dispatch_clip_grad

import sgdph_tools  # noqa: F401  (registers the optimizers)
from sgdph_tools import SGDPH, sgdph_param_groups
from sgdph_tools.optim.timm_registry import TIMM_OPTIMIZERS
from tests.conftest import batch_for, conv_bn_net


def timm_train_steps(model, optimizer, steps: int, *, loss_scaler=None, clip_grad=None) -> None:
    """The optimizer calls of timm's train.py (train_one_epoch), nothing else."""
    second_order = hasattr(optimizer, "is_second_order") and optimizer.is_second_order
    for step in range(steps):
        x, y = batch_for(model, seed=step)
        loss = F.cross_entropy(model(x), y)
        if loss_scaler is not None:
            loss_scaler(loss, optimizer, clip_grad=clip_grad, parameters=model.parameters(), create_graph=second_order)
        else:
            loss.backward(create_graph=second_order)
            if clip_grad is not None:
                dispatch_clip_grad(model.parameters(), clip_grad)
            optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("name", sorted(TIMM_OPTIMIZERS))
def test_every_registered_name_trains_in_timms_loop(name):
    torch.manual_seed(0)
    net = conv_bn_net()
    before = copy.deepcopy(net.state_dict())
    opt = timm.optim.create_optimizer_v2(net, opt=name, lr=0.05, weight_decay=5e-3)
    assert isinstance(opt, SGDPH) and opt.is_second_order and timm.optim.get_optimizer_info(name).second_order
    timm_train_steps(net, opt, 4, clip_grad=10.0)
    assert all(
        not torch.equal(net.state_dict()[k], v) for k, v in before.items() if "running" not in k and "num" not in k
    )
    emas = [opt.state[p]["hessian_ema"] for g in opt.param_groups if g["second_order"] for p in g["params"]]
    assert emas and sum(float(e.abs().sum()) > 0 for e in emas) >= 3  # real curvature reached the update


def test_timm_groups_are_split_by_the_authors_rule():
    net = conv_bn_net()
    opt = timm.optim.create_optimizer_v2(net, opt="sgdph", lr=0.01, weight_decay=5e-3, so_lr=2e-3)
    # timm's no-decay group (all 1-D params) is split by the authors' rule: last 1-D first-order.
    flags = [(g["second_order"], g["weight_decay"], len(g["params"])) for g in opt.param_groups]
    assert flags == [(True, 0.0, 4), (False, 0.0, 1), (False, 5e-3, 3)]
    assert all(g["so_lr"] == 2e-3 and g["momentum"] == 0.9 for g in opt.param_groups)
    tagged = timm.optim.create_optimizer_v2(net, opt="sgdph", lr=0.01, param_group_fn=sgdph_param_groups)
    assert [g["second_order"] for g in tagged.param_groups] == [True, False]


def test_only_drivable_names_are_registered():
    names = timm.optim.list_optimizers()
    assert set(TIMM_OPTIMIZERS) <= set(names) and "sgdphfd" not in names
    for name in TIMM_OPTIMIZERS:
        assert timm.optim.create_optimizer_v2(conv_bn_net(), opt=name).engine == "autograd"


@pytest.mark.parametrize("clip_grad", [None, 10.0], ids=["no-clip", "clip"])
def test_timms_native_scaler_gives_the_unscaled_hessian(clip_grad):
    """NativeScaler calls scaler.step(optimizer): the HVP of the scaled loss must be unscaled."""
    runs = []
    for scaler in (None, NativeScaler(device="cpu")):
        torch.manual_seed(0)
        net = conv_bn_net()
        opt = timm.optim.create_optimizer_v2(net, opt="sgdphhutchinson", lr=0.05)
        with warnings.catch_warnings():  # torch's protocol (grad_scale / found_inf), not its deprecated path
            warnings.simplefilter("error", FutureWarning)
            timm_train_steps(net, opt, 3, loss_scaler=scaler, clip_grad=clip_grad)
        runs.append((net, opt))
    (net, opt), (net_s, opt_s) = runs
    for p, q in zip(opt.param_groups[0]["params"], opt_s.param_groups[0]["params"]):
        D, D_s = opt.state[p]["hessian_ema"], opt_s.state[q]["hessian_ema"]
        assert D.abs().max() > 1e-4
        torch.testing.assert_close(D_s, D, rtol=1e-4, atol=1e-7)
    for p, q in zip(net.parameters(), net_s.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_a_timm_transformer_in_timms_loop_stops_with_the_fix_named():
    """timm builds ViTs with fused attention, which has no double backward."""
    torch.manual_seed(0)
    vit = timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1, num_classes=3)
    opt = timm.optim.create_optimizer_v2(vit, opt="sgdph", lr=0.01)
    x, y = torch.randn(2, 3, 16, 16), torch.tensor([0, 2])
    F.cross_entropy(vit(x), y).backward(create_graph=opt.is_second_order)
    with pytest.raises(RuntimeError, match=r"TIMM_FUSED_ATTN=0") as info:
        opt.step()
    assert "\n" not in str(info.value) and info.value.__cause__ is None
