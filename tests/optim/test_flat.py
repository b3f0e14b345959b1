"""The host-light update (sgdph_tools/optim/flat.py) against the per-tensor update: bit for bit."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sgdph_tools import SGDPH, sgdph_param_groups


def odd_net() -> nn.Module:
    """Channel counts that are not multiples of a vector width (3, 5, 7, 13): a flat buffer puts each
    tensor at another offset than its own storage, which must not change a single bit."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(5, 7), nn.BatchNorm1d(7), nn.ReLU(), nn.Linear(7, 13), nn.LayerNorm(13), nn.ReLU(), nn.Linear(13, 3)
    )


def train(net: nn.Module, steps: int, **settings) -> SGDPH:
    opt = SGDPH(sgdph_param_groups(net), lr=0.05, **(dict(estimator="hutchinson", hessian_every=3) | settings))
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.step(loss_fn=lambda: F.cross_entropy(net(x), y))
    return opt


CASES = {
    "normalized": dict(rule="normalized", weight_decay=1e-2),
    "paper": dict(rule="paper", so_lr=0.5, weight_decay=1e-2),
    "damped": dict(rule="damped"),
    "no-momentum": dict(momentum=0.0, weight_decay=1e-3),
    # a round robin, one tensor per step: 7 steps on the general path (some tensors without curvature),
    # then refreshes of one tensor folded into the flat state
    "round-robin": dict(estimator="rowsum", hessian_every=1, weight_decay=1e-2),
}


@pytest.mark.parametrize("case", CASES)
def test_the_flat_update_is_the_per_tensor_update_bit_for_bit(case):
    nets = [odd_net(), odd_net()]
    flat = train(nets[0], 9, foreach=None, **CASES[case])  # the default: the flat path between refreshes
    plain = train(nets[1], 9, foreach=False, **CASES[case])  # per tensor, never flat
    # the last step ran flat (its cached divisor is built by a flat step, refreshing or not)
    assert flat._flat[id(flat.param_groups[0])].cached_key is not None and not any(plain._flat.values())
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(p, q)
    for p, q in zip(flat.param_groups[0]["params"], plain.param_groups[0]["params"]):
        for key in ("momentum_buffer", "hessian_ema", "step", "hessian_refreshes"):
            if key in plain.state[q]:
                assert torch.equal(torch.as_tensor(flat.state[p][key]), torch.as_tensor(plain.state[q][key])), key


def test_the_authors_rule_runs_flat_and_bit_for_bit():
    nets = [odd_net(), odd_net()]
    opts = []
    for net, foreach in zip(nets, (None, False)):
        opt = SGDPH(net.parameters(), lr=0.05, authors_code=True, foreach=foreach)
        g = torch.Generator().manual_seed(1)
        for _ in range(12):
            x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
            opt.step(loss_fn=lambda: F.cross_entropy(net(x), y))
        opts.append(opt)
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(p, q)


def test_the_state_stays_per_parameter_and_a_checkpoint_continues_exactly():
    net = odd_net()
    opt = train(net, 7)
    group = opt.param_groups[0]
    flat = opt._flat[id(group)]
    assert flat is not None
    # every entry is a view of the flat buffers: the general path's in-place updates reach them
    for p in flat.params:
        assert opt.state[p]["momentum_buffer"].untyped_storage().data_ptr() == flat.buf.untyped_storage().data_ptr()
    saved = copy.deepcopy(opt.state_dict())
    assert set(saved["state"]) == set(range(sum(len(g["params"]) for g in opt.param_groups)))
    twin_net = copy.deepcopy(net)
    twin = SGDPH(sgdph_param_groups(twin_net), lr=0.05, estimator="hutchinson", hessian_every=3)
    twin.load_state_dict(saved)
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        x, y = torch.randn(16, 5, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.step(loss_fn=lambda: F.cross_entropy(net(x), y))
        twin.step(loss_fn=lambda: F.cross_entropy(twin_net(x), y))
    for p, q in zip(net.parameters(), twin_net.parameters()):
        assert torch.equal(p, q)


def test_a_frozen_tensor_takes_the_per_tensor_path():
    nets = [odd_net(), odd_net()]
    for net in nets:
        net[1].bias.requires_grad_(False)  # no gradient: the flat path steps aside
    flat, plain = (train(net, 8, foreach=f) for net, f in zip(nets, (None, False)))
    for p, q in zip(nets[0].parameters(), nets[1].parameters()):
        assert torch.equal(p, q)


#: (estimator settings, host reads on a refreshing step, and why each is needed)
HOST_READS = {
    # the finiteness of the estimate: it decides whether the curvature state is updated
    "gnb-sub-batch": (dict(estimator="gnb", gnb_fraction=0.25), 1),
    "gnb-logits": (dict(estimator="gnb"), 1),
    # and the finite-difference step r = sqrt(eps)·max(1, rms θ) / rms v (both root-mean-squares in one read)
    "rowsum-fd": (dict(estimator="rowsum", engine="finite_difference"), 2),
    "hutchinson-fd": (dict(estimator="hutchinson", engine="finite_difference"), 2),
}


@pytest.mark.parametrize("case", HOST_READS)
def test_steps_read_nothing_back_from_the_device_but_what_a_refresh_decides_on(case):
    """Host reads per step (:func:`host_reads`) over steps 2-7 (refreshes at 4 and 7): none between
    refreshes, on a refresh only the reads listed above -- a host-device synchronisation drains the
    launch queue on a GPU. The first step (it creates the state) is not counted."""
    from tests.conftest import batch_for, conv_bn_net, host_reads

    settings, on_refresh = HOST_READS[case]
    torch.manual_seed(0)
    net = conv_bn_net()
    x, y = batch_for(net)
    opt = SGDPH(sgdph_param_groups(net), lr=0.05, weight_decay=5e-4, hessian_every=3, model=net, **settings)

    def loss_fn():
        logits = net(x)
        return F.cross_entropy(logits, y), logits

    opt.step(loss_fn=loss_fn)
    reads = [host_reads(lambda: opt.step(loss_fn=loss_fn)) for _ in range(6)]
    assert reads == [0, 0, on_refresh, 0, 0, on_refresh]


def test_host_reads_are_counted_however_they_are_made():
    from tests.conftest import host_reads

    t = torch.randn(4)
    assert host_reads(lambda: (t.tolist(), t[0].item(), bool(t[0] > 0), float(t[1]), t.cpu())) == 5
    assert host_reads(lambda: t * 2) == 0
