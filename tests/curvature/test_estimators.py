"""Every estimator and engine against the exact Hessian from torch.autograd.functional.hessian."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from sgdph_tools.curvature import ForwardReplay, partial_hessian, rademacher_like
from sgdph_tools.curvature.products import finite_difference_step
from tests.conftest import batch_for, conv_bn_net, ln_mlp

NETS = {"conv_bn": conv_bn_net, "ln_mlp": ln_mlp}


def one_d_params(net: nn.Module) -> tuple[list[str], list[torch.Tensor]]:
    """The 1-D parameters except the classifier bias (whose Hessian rows sum to zero)."""
    named = [(n, p) for n, p in net.named_parameters() if p.ndim == 1][:-1]
    return [n for n, _ in named], [p for _, p in named]


def exact_blocks(net, x, y, names, params):
    """H[i][j]: the exact Hessian block between params i and j (float64 recommended)."""

    def loss_of(*values):
        return F.cross_entropy(functional_call(net, dict(zip(names, values)), (x,)), y)

    return torch.autograd.functional.hessian(loss_of, tuple(p.detach() for p in params))


def rel_err(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """Norm-relative error over all tensors together."""
    a, b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
    return ((a - b).norm() / b.norm()).item()


def setup(kind, act=None, dtype=torch.float64, seed=0, dropout=0.0):
    torch.manual_seed(seed)
    net = (NETS[kind](act, dropout=dropout) if act else NETS[kind](dropout=dropout)).to(dtype)
    x, y = batch_for(net, dtype=dtype, seed=seed)
    names, params = one_d_params(net)
    return net, x, y, names, params


@pytest.mark.parametrize("kind", sorted(NETS))
@pytest.mark.parametrize("engine", ["autograd", "finite_difference"])
def test_estimators_match_exact_hessian_in_float64(kind, engine):
    net, x, y, names, params = setup(kind)
    H = exact_blocks(net, x, y, names, params)
    k = range(len(params))
    loss_fn = lambda: F.cross_entropy(net(x), y)  # noqa: E731
    tol = 1e-10 if engine == "autograd" else 1e-5

    rowsum = partial_hessian(loss_fn, params, "rowsum", engine)
    assert rel_err(rowsum, [H[i][i].sum(1) for i in k]) < tol

    diagonal = partial_hessian(loss_fn, params, "diagonal", engine)
    assert rel_err(diagonal, [H[i][i].diagonal() for i in k]) < tol

    hutch = partial_hessian(loss_fn, params, "hutchinson", engine, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)
    z = [rademacher_like(p, g) for p in params]  # the same draws, in the same order
    hz = [sum(H[i][j] @ z[j] for j in k) for i in k]
    assert rel_err(hutch, [z[i] * hz[i] for i in k]) < tol


def test_hutchinson_is_unbiased_for_the_true_diagonal():
    net, x, y, names, params = setup("conv_bn")
    H = exact_blocks(net, x, y, names, params)
    true_diag = [H[i][i].diagonal() for i in range(len(params))]
    loss_fn = lambda: F.cross_entropy(net(x), y)  # noqa: E731
    g = torch.Generator().manual_seed(0)
    draws = [partial_hessian(loss_fn, params, "hutchinson", generator=g) for _ in range(400)]
    mean = [torch.stack(d).mean(0) for d in zip(*draws)]
    one = draws[0]
    # The average of 400 probes is much closer to the diagonal than a single probe.
    assert rel_err(mean, true_diag) < 0.25 * rel_err(one, true_diag)


@pytest.mark.parametrize("kind,act", [("conv_bn", nn.GELU), ("ln_mlp", nn.GELU), ("ln_mlp", nn.Tanh)])
@pytest.mark.parametrize("estimator", ["rowsum", "hutchinson"])
@pytest.mark.parametrize("seed", [0, 1])
def test_finite_difference_matches_autograd_in_float32(kind, act, estimator, seed):
    net, x, y, names, params = setup(kind, act, torch.float32, seed)
    loss_fn = lambda: F.cross_entropy(net(x), y)  # noqa: E731
    ad = partial_hessian(loss_fn, params, estimator, "autograd", generator=torch.Generator().manual_seed(1))
    fd = partial_hessian(loss_fn, params, estimator, "finite_difference", generator=torch.Generator().manual_seed(1))
    assert rel_err(fd, ad) < 1e-2


def test_channelwise_blocks_are_not_diagonal():
    """The paper's claim that the BN-gamma Hessian block is diagonal, checked: it is not, and the
    row sum H·1 (what the method computes) differs from the diagonal."""
    net, x, y, names, params = setup("conv_bn", seed=0)
    H = exact_blocks(net, x, y, names, params)
    block = H[0][0]  # first BN's gamma
    off = block - torch.diag(block.diagonal())
    assert off.norm() > 0.1 * block.diagonal().norm()
    assert not torch.allclose(block.sum(1), block.diagonal(), rtol=0.05)


def test_classifier_bias_rowsum_is_zero_under_softmax_cross_entropy():
    torch.manual_seed(0)
    net = conv_bn_net().double()
    x, y = batch_for(net, dtype=torch.float64)
    bias = net[-1].bias
    (h,) = partial_hessian(lambda: F.cross_entropy(net(x), y), [bias], "rowsum")
    (d,) = partial_hessian(lambda: F.cross_entropy(net(x), y), [bias], "diagonal")
    assert h.abs().max() < 1e-15
    assert d.abs().min() > 1e-3  # its diagonal is not zero: only the row sums are


def test_finite_difference_replays_dropout_and_restores_batchnorm_stats():
    # In float64 the forward difference is exact to ~1e-6 -- but only if the perturbed forward
    # draws the same dropout mask; with dropout p=0.5 a different mask would be off by O(1).
    net, x, y, names, params = setup("conv_bn", dropout=0.5)
    ad_net, reference = copy.deepcopy(net), copy.deepcopy(net)
    torch.manual_seed(7)
    F.cross_entropy(reference(x), y)  # one real forward: what the running stats should see
    rng_after_one_forward = torch.get_rng_state()

    torch.manual_seed(7)
    ad = partial_hessian(lambda: F.cross_entropy(ad_net(x), y), one_d_params(ad_net)[1], "rowsum", "autograd")
    torch.manual_seed(7)
    fd = partial_hessian(lambda: F.cross_entropy(net(x), y), params, "rowsum", "finite_difference")
    assert rel_err(fd, ad) < 1e-5
    assert torch.equal(torch.get_rng_state(), rng_after_one_forward)
    for bn, bn_ref in ((net[1], reference[1]), (net[4], reference[4])):
        assert torch.equal(bn.running_mean, bn_ref.running_mean)
        assert torch.equal(bn.running_var, bn_ref.running_var)
        assert bn.num_batches_tracked == bn_ref.num_batches_tracked == 1
    # ...and the parameters are back, bit for bit.
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), reference.parameters()))


def test_forward_replay_gives_identical_gradients():
    net, x, y, names, params = setup("conv_bn", dtype=torch.float32, dropout=0.3)
    replay = ForwardReplay(lambda: F.cross_entropy(net(x), y))
    g0 = torch.autograd.grad(replay.first(), params)
    g1 = replay.again_grad(params)
    assert all(torch.equal(a, b) for a, b in zip(g0, g1))


def test_finite_difference_step_scales_with_the_parameters():
    small = [torch.zeros(4)]
    large = [torch.full((4,), 100.0)]
    v = [torch.ones(4)]
    eps = torch.finfo(torch.float32).eps
    assert finite_difference_step(small, v) == pytest.approx(eps**0.5)
    assert finite_difference_step(large, v) == pytest.approx(100 * eps**0.5)


def test_bad_inputs_raise_clear_errors():
    net, x, y, names, params = setup("ln_mlp")
    with pytest.raises(ValueError, match="unknown estimator 'row'"):
        partial_hessian(lambda: F.cross_entropy(net(x), y), params, estimator="row")
    with pytest.raises(ValueError, match="unknown engine"):
        partial_hessian(lambda: F.cross_entropy(net(x), y), params, engine="fd")
    with pytest.raises(TypeError, match="scalar loss"):
        partial_hessian(lambda: F.cross_entropy(net(x), y, reduction="none"), params)
    with pytest.raises(RuntimeError, match="does not require grad"):
        with torch.no_grad():
            partial_hessian(lambda: F.cross_entropy(net(x), y).detach(), params)
    assert partial_hessian(lambda: F.cross_entropy(net(x), y), []) == []
