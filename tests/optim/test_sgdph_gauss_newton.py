"""SGD-PH with the Gauss-Newton estimates: the closure or loss_fn returns (loss, logits); the
estimates reach the Hessian EMA as the exact GGN quantities, unscaled under AMP."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from sgdph_tools import SGDPH, sgdph_param_groups
from sgdph_tools.curvature import gauss_newton_bartlett
from tests.conftest import batch_for, conv_bn_net
from tests.curvature.test_gauss_newton import brute_force_ggn


def loss_and_logits(net, x, y):
    logits = net(x)
    return F.cross_entropy(logits, y), logits


def test_gauss_newton_engine_gives_the_exact_ggn_row_sums():
    torch.manual_seed(0)
    net = conv_bn_net().double()
    x, y = batch_for(net, dtype=torch.float64)
    params = sgdph_param_groups(net)[0]["params"]
    G, _ = brute_force_ggn(net, x, params)
    n = params[0].numel()
    opt = SGDPH(sgdph_param_groups(net), lr=0.0, engine="gauss_newton", hessian_momentum=0.9)
    opt.step(loss_fn=lambda: loss_and_logits(net, x, y))
    # Step 1 refreshes the first tensor (round robin); BN in train mode saw the same batch twice.
    torch.testing.assert_close(
        opt.state[params[0]]["hessian_ema"], 0.1 * G[:n, :n].sum(1).abs(), rtol=1e-10, atol=1e-14
    )


@pytest.mark.parametrize("usage", ["loss_fn", "closure"])
def test_gnb_refreshes_every_tensor_with_a_non_negative_estimate(usage):
    torch.manual_seed(0)
    net = conv_bn_net()
    opt = SGDPH(sgdph_param_groups(net), lr=0.05, estimator="gnb")
    assert opt.is_second_order  # the closure's backward must keep the logits' graph
    for step in range(3):
        x, y = batch_for(net, seed=step)
        if usage == "loss_fn":
            opt.step(loss_fn=lambda: loss_and_logits(net, x, y))
        else:

            def closure():
                opt.zero_grad()
                loss, logits = loss_and_logits(net, x, y)
                loss.backward(create_graph=opt.is_second_order)
                return loss, logits

            opt.step(closure)
    for p in opt.param_groups[0]["params"]:
        assert opt.state[p]["hessian_refreshes"] == 3 and (opt.state[p]["hessian_ema"] >= 0).all()
        assert opt.state[p]["hessian_ema"].sum() > 0


def test_gnb_in_the_optimizer_is_the_primitive():
    torch.manual_seed(0)
    net = conv_bn_net().double()
    x, y = batch_for(net, dtype=torch.float64)
    params = sgdph_param_groups(net)[0]["params"]
    opt = SGDPH(sgdph_param_groups(net), lr=0.0, estimator="gnb", seed=3)
    probes = opt.refresh_schedule.generator(1)  # what step 1 draws its labels with
    expected = gauss_newton_bartlett(net(x), params, probes)
    torch.manual_seed(0)
    opt.step(loss_fn=lambda: loss_and_logits(net, x, y))
    for p, e in zip(params, expected):
        torch.testing.assert_close(opt.state[p]["hessian_ema"], 0.1 * e, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("options", [dict(estimator="gnb"), dict(engine="gauss_newton")], ids=["gnb", "ggn"])
def test_the_estimates_from_logits_are_not_divided_by_the_loss_scale(options):
    runs = []
    for scaler in (None, torch.amp.GradScaler("cpu", init_scale=2.0**10)):
        torch.manual_seed(0)
        net = conv_bn_net()
        opt = SGDPH(sgdph_param_groups(net), lr=0.05, **options)
        for step in range(2):
            x, y = batch_for(net, seed=step)
            opt.step(loss_fn=lambda: loss_and_logits(net, x, y), scaler=scaler)
            if scaler is not None:
                scaler.update()
        runs.append(opt)
    for p, q in zip(runs[0].param_groups[0]["params"], runs[1].param_groups[0]["params"]):
        torch.testing.assert_close(
            runs[1].state[q]["hessian_ema"], runs[0].state[p]["hessian_ema"], rtol=1e-4, atol=1e-8
        )


def test_without_logits_or_with_a_freed_graph_the_error_names_the_fix():
    net = conv_bn_net()
    x, y = batch_for(net)
    opt = SGDPH(sgdph_param_groups(net), estimator="gnb")
    with pytest.raises(RuntimeError, match=r"return \(loss, logits\)"):
        opt.step(loss_fn=lambda: F.cross_entropy(net(x), y))

    def closure():
        opt.zero_grad()
        loss, logits = loss_and_logits(net, x, y)
        loss.backward()  # frees the graph the estimate needs
        return loss, logits

    with pytest.raises(RuntimeError, match="create_graph=optimizer.is_second_order"):
        opt.step(closure)


# ----------------------------------------------------------------------------- GNB from a sub-batch


@pytest.mark.parametrize("fraction, rows", [(1.0, 8), (0.5, 4), (0.1, 2)])
def test_gnb_fraction_is_the_primitive_on_the_leading_rows(fraction, rows):
    """The sub-batch estimate is exactly GNB on the logits of the batch's first rows (at least 2,
    for BatchNorm), drawn with the step's generator: unbiased for that sub-batch's GGN diagonal."""
    torch.manual_seed(0)
    net = conv_bn_net().double()
    x, y = batch_for(net, dtype=torch.float64)
    params = sgdph_param_groups(net)[0]["params"]
    opt = SGDPH(sgdph_param_groups(net), lr=0.0, estimator="gnb", gnb_fraction=fraction, model=net, seed=3)
    assert not opt.is_second_order  # the step's own backward keeps no graph
    expected = gauss_newton_bartlett(net(x[:rows]), params, opt.refresh_schedule.generator(1))
    opt.step(loss_fn=lambda: F.cross_entropy(net(x), y))  # no logits needed
    for p, e in zip(params, expected):
        torch.testing.assert_close(opt.state[p]["hessian_ema"], 0.1 * e, rtol=1e-10, atol=1e-14)


def test_gnb_fraction_leaves_the_training_run_as_it_was():
    """Its extra forward changes no BatchNorm statistic, no RNG draw (dropout) and no requires_grad
    flag: after one step the buffers and the RNG are where the step from the logits leaves them."""
    after = []
    for fraction in (None, 0.5):
        torch.manual_seed(0)
        net = conv_bn_net(dropout=0.3)
        opt = SGDPH(sgdph_param_groups(net), lr=0.05, estimator="gnb", gnb_fraction=fraction, model=net)
        x, y = batch_for(net)
        opt.step(loss_fn=lambda: loss_and_logits(net, x, y))
        assert all(p.requires_grad for p in net.parameters())
        after.append([b.clone() for b in net.buffers()] + [torch.rand(3)])
    for plain, sub_batch in zip(*after):
        torch.testing.assert_close(sub_batch, plain, rtol=0, atol=0)
    assert int(after[1][2]) == 1  # num_batches_tracked: one forward counted


def test_gnb_fraction_runs_in_a_standard_loop():
    torch.manual_seed(0)
    net = conv_bn_net()
    opt = SGDPH(sgdph_param_groups(net), lr=0.05, estimator="gnb", gnb_fraction=0.5, model=net)
    for step in range(2):  # timm's loop: backward(create_graph=optimizer.is_second_order), step()
        x, y = batch_for(net, seed=step)
        opt.zero_grad()
        F.cross_entropy(net(x), y).backward(create_graph=opt.is_second_order)
        opt.step()
    for p in opt.param_groups[0]["params"]:
        assert opt.state[p]["hessian_refreshes"] == 2 and opt.state[p]["hessian_ema"].sum() > 0


def test_gnb_fraction_errors_name_the_fix():
    net = conv_bn_net()
    groups = sgdph_param_groups(net)
    with pytest.raises(ValueError, match="needs model="):
        SGDPH(groups, estimator="gnb", gnb_fraction=0.5)
    with pytest.raises(ValueError, match="estimator='gnb' only"):
        SGDPH(groups, estimator="rowsum", gnb_fraction=0.5, model=net)
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"must be in \(0, 1\]"):
            SGDPH(groups, estimator="gnb", gnb_fraction=bad, model=net)
    opt = SGDPH(groups, estimator="gnb", gnb_fraction=0.5, model=net)
    x, y = batch_for(net)
    net.eval()  # an eval forward is not recorded: there is no training input yet
    with pytest.raises(RuntimeError, match="has not run a forward in train mode"):
        opt.step(loss_fn=lambda: F.cross_entropy(net(x), y))


@pytest.mark.parametrize("fraction", [None, 0.5], ids=["logits", "sub-batch"])
def test_gnb_on_a_diverged_model_keeps_its_estimate_and_returns_the_non_finite_loss(fraction):
    """A model whose logits went non-finite is the caller's divergence to detect (from the loss the
    step returns), as with SGDM: GNB's label sampling must not raise in between."""
    torch.manual_seed(0)
    net = conv_bn_net()
    x, y = batch_for(net)
    opt = SGDPH(sgdph_param_groups(net), lr=0.05, estimator="gnb", gnb_fraction=fraction, model=net)
    opt.step(loss_fn=lambda: loss_and_logits(net, x, y))
    params = opt.param_groups[0]["params"]
    before = [opt.state[p]["hessian_ema"].clone() for p in params]
    with torch.no_grad():
        next(p for p in net.parameters() if p.ndim > 1).fill_(float("inf"))
    loss = opt.step(loss_fn=lambda: loss_and_logits(net, x, y))
    assert not torch.isfinite(loss)
    for p, b in zip(params, before):
        assert torch.equal(opt.state[p]["hessian_ema"], b)
    logits = net(x)
    assert all(torch.isnan(h).all() for h in gauss_newton_bartlett(logits, params))
