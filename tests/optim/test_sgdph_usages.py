"""The torch.optim contract in every mode: a standard closure with each engine and estimator, the
finite-difference engine's re-evaluation (real gradients kept, BatchNorm statistics and dropout
replayed, a cheap backward), and transformers whose fused attention has no double backward."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F

from sgdph_tools import SGDPH, sgdph_param_groups
from tests.conftest import batch_for, conv_bn_net

ENGINES_AND_ESTIMATORS = [(e, s) for e in ("autograd", "finite_difference") for s in ("rowsum", "hutchinson")]


def make(options, dropout=0.2, net=None):
    torch.manual_seed(0)
    net = net if net is not None else conv_bn_net(dropout=dropout)
    return net, SGDPH(sgdph_param_groups(net), lr=0.05, weight_decay=1e-3, **options)


def closure_for(net, opt, x, y, *, set_to_none=True):
    def closure():
        opt.zero_grad(set_to_none=set_to_none)
        loss = F.cross_entropy(net(x), y)
        loss.backward(create_graph=opt.is_second_order)
        return loss

    return closure


def run(net, opt, usage, steps=5, **closure_kw):
    torch.manual_seed(1)  # dropout masks
    losses = []
    for step in range(steps):
        x, y = batch_for(net, seed=step)
        if usage == "closure":
            losses.append(opt.step(closure_for(net, opt, x, y, **closure_kw)))
        else:
            losses.append(opt.step(loss_fn=lambda: F.cross_entropy(net(x), y)))
    return torch.stack([loss.detach() for loss in losses])


@pytest.mark.parametrize("engine,estimator", ENGINES_AND_ESTIMATORS)
def test_a_standard_closure_trains_like_loss_fn(engine, estimator):
    """The same batches, dropout and BatchNorm: a closure and loss_fn take the same steps."""
    options = dict(engine=engine, estimator=estimator)
    net_c, opt_c = make(options)
    net_b, opt_b = make(options)
    losses_c, losses_b = run(net_c, opt_c, "closure"), run(net_b, opt_b, "loss_fn")
    torch.testing.assert_close(losses_c, losses_b, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(net_c.state_dict().items(), net_b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
    for p in opt_c.param_groups[0]["params"]:
        assert opt_c.state[p]["step"] == 5
    assert any(opt_c.state[p]["hessian_ema"].abs().sum() > 0 for p in opt_c.param_groups[0]["params"])


def test_the_re_evaluation_keeps_real_gradients_statistics_and_randomness():
    net, opt = make(dict(engine="finite_difference"), dropout=0.3)
    x, y = batch_for(net)
    calls = []

    def closure():
        opt.zero_grad(set_to_none=False)  # zeroes in place: the kept gradients must not be these tensors
        calls.append([name for name, p in net.named_parameters() if p.requires_grad])
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        return loss

    reference = copy.deepcopy(net)
    torch.manual_seed(5)
    F.cross_entropy(reference(x), y).backward()  # the real gradient and BN update of one forward
    rng_after_one_forward = torch.get_rng_state()
    torch.manual_seed(5)
    opt.step(closure)
    assert len(calls) == 2  # the real evaluation and one re-evaluation at θ + r·v
    assert len(calls[0]) == 8 and calls[1] == ["1.weight"]  # the cheap backward: only the refreshed tensor
    assert all(p.requires_grad for p in net.parameters())  # switched back on
    assert torch.equal(torch.get_rng_state(), rng_after_one_forward)  # randomness as after one forward
    for name in ("1.running_mean", "1.running_var", "4.running_mean", "1.num_batches_tracked"):
        assert torch.equal(net.state_dict()[name], reference.state_dict()[name]), name
    # The update used the real gradient: SGD's step for the params the Hessian does not touch yet.
    lin = dict(reference.named_parameters())["9.weight"]
    torch.testing.assert_close(net[9].weight, lin.detach() - 0.05 * (lin.grad + 1e-3 * lin.detach()))


def test_a_closure_without_create_graph_is_a_clear_error():
    net, opt = make({})
    x, y = batch_for(net)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()  # forgot create_graph=optimizer.is_second_order
        return loss

    with pytest.raises(RuntimeError, match="create_graph=optimizer.is_second_order"):
        opt.step(closure)


@pytest.mark.parametrize("usage", ["closure", "loss_fn"])
def test_max_grad_norm_clips_the_gradients_the_optimizer_computed(usage):
    net, opt = make({}, dropout=0.0)
    x, y = batch_for(net)
    if usage == "closure":
        opt.step(closure_for(net, opt, x, y), max_grad_norm=1e-3)
    else:
        opt.step(loss_fn=lambda: F.cross_entropy(net(x), y), max_grad_norm=1e-3)
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad) for p in net.parameters()]))
    assert norm <= 1e-3 * (1 + 1e-5)


def tiny_vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=1, num_classes=3)


@pytest.mark.parametrize("usage", ["closure", "loss_fn"])
def test_a_timm_transformer_trains_when_the_optimizer_runs_the_forward(usage):
    """Fused attention has no double backward; the optimizer selects the math path for the Hessian pass."""
    vit = tiny_vit()
    opt = SGDPH(sgdph_param_groups(vit), lr=0.01)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 0])
    losses = []
    for _ in range(3):
        if usage == "closure":
            losses.append(opt.step(closure_for(vit, opt, x, y)).item())
        else:
            losses.append(opt.step(loss_fn=lambda: F.cross_entropy(vit(x), y)).item())
    assert losses[-1] < losses[0]
    assert sum(opt.state[p]["hessian_refreshes"] for p in opt.param_groups[0]["params"]) == 3


def test_model_argument_must_be_a_module():
    net = conv_bn_net()
    with pytest.raises(TypeError, match="nn.Module"):
        SGDPH(net.parameters(), model=net.parameters())


def test_with_model_the_re_evaluation_also_keeps_gradients_outside_the_optimizer():
    """model= tells the optimizer every parameter the closure's backward writes to."""
    torch.manual_seed(0)
    net = conv_bn_net()
    head = net[9].weight  # requires grad, but the optimizer does not update it
    second, first = sgdph_param_groups(net)
    first["params"] = [p for p in first["params"] if p is not head]
    opt = SGDPH([second, first], engine="finite_difference", model=net)
    x, y = batch_for(net)
    twin = copy.deepcopy(net)
    F.cross_entropy(twin(x), y).backward()
    net.zero_grad()
    opt.step(closure_for(net, opt, x, y))
    torch.testing.assert_close(head.grad, twin[9].weight.grad)
