"""``rule="block_newton"`` against independent truths in float64: the exact mode's step against a
brute-force GGN block (Jacobians), the cheap mode's estimate converging to that block and its step
against a direct solve; the defaults, the bounds on block size, resume, and the errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sgdph_tools import SGDPH, sgdph_param_groups
from sgdph_tools.curvature.cg import conjugate_gradient
from sgdph_tools.curvature.gauss_newton import bartlett_curvature, bartlett_gradients
from sgdph_tools.surgery.rewrite import convert
from tests.conftest import batch_for, conv_bn_net, ln_mlp
from tests.curvature.test_gauss_newton import brute_force_ggn


def wn_mlp() -> nn.Module:
    """A no-norm MLP whose linears are weight-normalised by the project's surgery (gamma, bias 1-D)."""
    net = nn.Sequential(nn.Linear(5, 9), nn.Tanh(), nn.Linear(9, 6), nn.Tanh(), nn.Linear(6, 3))
    convert(net, wn=True, example_input=torch.randn(4, 5))
    return net


NETS = {"conv-bn": conv_bn_net, "wn-mlp": wn_mlp, "ln-mlp": ln_mlp}


def second_order(opt: SGDPH) -> list[torch.Tensor]:
    return [p for g in opt.param_groups if g["second_order"] for p in g["params"]]


def blocks_of(G: torch.Tensor, params: list[torch.Tensor]) -> list[torch.Tensor]:
    out, start = [], 0
    for p in params:
        n = p.numel()
        out.append(G[start : start + n, start : start + n])
        start += n
    return out


@pytest.mark.parametrize("net_name", sorted(NETS))
@pytest.mark.parametrize("usage", ["closure", "loss_fn"])
def test_exact_step_is_the_damped_newton_step_on_each_ggn_block(net_name, usage):
    """momentum 0, weight decay 0, so_lr 1, cg_steps ≥ the block size: Δθ_k = −lr·(G_kk + εI)⁻¹ g_k."""
    torch.manual_seed(0)
    net = NETS[net_name]().double()
    x, y = batch_for(net, dtype=torch.float64)
    lr, eps = 0.3, 0.05
    opt = SGDPH(
        sgdph_param_groups(net), lr=lr, momentum=0.0, rule="block_newton", engine="gauss_newton",
        so_lr=1.0, eps=eps, cg_steps=64,
    )  # fmt: skip
    params = second_order(opt)
    assert len({p.numel() for p in params}) >= 2  # several block sizes
    G, logits = brute_force_ggn(net, x, params)
    g = torch.autograd.grad(F.cross_entropy(logits, y), params)
    expected = [
        p.detach() - lr * torch.linalg.solve(block + eps * torch.eye(len(block), dtype=block.dtype), gk.reshape(-1))
        .view_as(p)
        for p, gk, block in zip(params, g, blocks_of(G, params))
    ]  # fmt: skip

    def closure():
        opt.zero_grad()
        out = net(x)
        loss = F.cross_entropy(out, y)
        loss.backward(create_graph=opt.is_second_order)
        return loss, out

    def loss_fn():
        out = net(x)
        return F.cross_entropy(out, y), out

    opt.step(closure) if usage == "closure" else opt.step(loss_fn=loss_fn)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=1e-9, atol=1e-11)


def test_conjugate_gradient_solves_and_never_divides_by_zero_curvature():
    torch.manual_seed(0)
    a = torch.randn(12, 6, dtype=torch.float64)
    M = a.T @ a  # PSD, rank 6
    b = torch.randn(6, dtype=torch.float64)
    solved = conjugate_gradient(lambda v: M @ v, b, damping=0.1, max_iters=6)
    torch.testing.assert_close(solved.solution, torch.linalg.solve(M + 0.1 * torch.eye(6, dtype=M.dtype), b))
    assert solved.relative_residual < 1e-10
    # Zero curvature and no damping: the first direction has none; the iterate (0) comes back, no NaN.
    none = conjugate_gradient(lambda v: torch.zeros_like(v), b, damping=0.0, max_iters=5)
    assert none.iterations == 0 and torch.equal(none.solution, torch.zeros_like(b))
    # A small residual stops early.
    early = conjugate_gradient(lambda v: 2 * v, b, damping=0.0, max_iters=50)
    assert early.iterations == 1
    torch.testing.assert_close(early.solution, b / 2)


def test_gnb_block_estimate_is_unbiased_for_the_ggn_block():
    """The mean of N draws of b·ĝĝᵀ stays within 4.5 standard errors of G_kk entrywise, off the
    diagonal too, and N draws are much closer than a few."""
    torch.manual_seed(0)
    net = conv_bn_net().double()
    x, _ = batch_for(net, n=6, dtype=torch.float64)
    params = [p for p in net.parameters() if p.ndim == 1]
    G, logits = brute_force_ggn(net, x, params)
    targets = blocks_of(G, params)
    gen = torch.Generator().manual_seed(1)
    draws = [bartlett_curvature(*bartlett_gradients(logits, params, gen), [True] * len(params)) for _ in range(3000)]
    for k, target in enumerate(targets):
        stack = torch.stack([d[k] for d in draws])
        mean, se = stack.mean(0), stack.std(0) / len(draws) ** 0.5
        assert ((mean - target).abs() <= 4.5 * se + 1e-12).all(), k
        assert (target - torch.diag(torch.diagonal(target))).abs().sum() > 0.1 * target.diagonal().abs().sum()
        few = stack[:5].mean(0)
        assert (mean - target).norm() < 0.5 * (few - target).norm()
    # The diagonal form is the block's diagonal, draw for draw.
    gen_a, gen_b = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    full = bartlett_curvature(*bartlett_gradients(logits, params, gen_a), [True] * len(params))
    diag = bartlett_curvature(*bartlett_gradients(logits, params, gen_b))
    for f, d in zip(full, diag):
        torch.testing.assert_close(torch.diagonal(f), d)


@pytest.mark.parametrize("rule", ["block_newton", "block_normalized"])
def test_cheap_step_solves_the_averaged_block(rule):
    """After one refresh (momentum 0): Δθ_k = −lr·so_lr·(Ĝ_k + εI)⁻¹ g_k with Ĝ_k the bias-corrected
    average kept in the state, solved here directly; tensors above block_max use its diagonal.
    block_normalized: (Ĝ_k / mean diag Ĝ_k + εI)⁻¹ g_k scaled to |g_k|, τ unused."""
    torch.manual_seed(0)
    net = conv_bn_net().double()
    x, y = batch_for(net, dtype=torch.float64)
    lr, eps, so_lr = 0.2, 0.01, 0.5
    opt = SGDPH(
        sgdph_param_groups(net), lr=lr, momentum=0.0, rule=rule, so_lr=so_lr, eps=eps, block_max=4,
        hessian_momentum=0.8,
    )  # fmt: skip
    params = second_order(opt)
    before = [p.detach().clone() for p in params]
    out = net(x)
    loss = F.cross_entropy(out, y)
    opt.zero_grad()
    loss.backward(create_graph=True)  # estimator gnb from the logits: the graph is kept
    grads = [p.grad.detach().clone() for p in params]
    opt.step(lambda: (loss, out))
    kinds = set()
    normalized = rule == "block_normalized"
    for p, p0, g in zip(params, before, grads):
        state = opt.state[p]
        if p.numel() <= 4:
            kinds.add("block")
            G = state["hessian_block"] / (1 - 0.8)
            G = G / G.diagonal().mean() if normalized else G
            d = torch.linalg.solve(G + eps * torch.eye(p.numel(), dtype=G.dtype), g)
        else:
            kinds.add("diagonal")
            assert "hessian_block" not in state
            D = state["hessian_ema"] / (1 - 0.8)
            d = g / ((D / D.mean() if normalized else D) + eps)
        step = d * g.norm() / d.norm() if normalized else so_lr * d
        torch.testing.assert_close(p.detach(), p0 - lr * step, rtol=1e-9, atol=1e-12)
        if normalized:  # SGD's length, the block's direction
            assert not torch.allclose(step, g)
    assert kinds == {"block", "diagonal"}


def test_rule_alone_is_the_cheap_mode_and_trains_in_a_standard_loop():
    torch.manual_seed(0)
    net = conv_bn_net()
    opt = SGDPH(sgdph_param_groups(net), lr=0.1, rule="block_newton", model=net)
    assert (opt.estimator, opt.gnb_fraction) == ("gnb", 0.25)
    assert not opt.is_second_order  # its own forward on the sub-batch: a plain backward suffices
    x, y = batch_for(net, n=32)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]  # measured 0.54x; the default normalized mode: 0.62x
    assert all("hessian_block" in opt.state[p] for p in second_order(opt))


def test_resume_is_bit_exact_between_refreshes():
    """The inverses are a cache: rebuilt from the loaded state, they give the same steps."""

    def run(split: int | None):
        torch.manual_seed(0)
        net = conv_bn_net()
        x, y = batch_for(net, n=16)
        opt = SGDPH(sgdph_param_groups(net), lr=0.1, rule="block_newton", model=net, hessian_every=3)
        for step in range(7):
            if step == split:
                state, weights = opt.state_dict(), net.state_dict()
                torch.manual_seed(123)
                net = conv_bn_net()
                net.load_state_dict(weights)
                opt = SGDPH(sgdph_param_groups(net), lr=0.1, rule="block_newton", model=net, hessian_every=3)
                opt.load_state_dict(state)
            opt.zero_grad()
            F.cross_entropy(net(x), y).backward()
            opt.step()
        return [p.detach() for p in net.parameters()]

    for a, b in zip(run(None), run(4)):
        assert torch.equal(a, b)


def test_bad_choices_are_named():
    net = conv_bn_net()
    groups = sgdph_param_groups(net)
    with pytest.raises(ValueError, match="needs Gauss-Newton curvature.*estimator='gnb'"):
        SGDPH(groups, rule="block_newton", estimator="rowsum")
    with pytest.raises(ValueError, match="hessian_every must be 1"):
        SGDPH(groups, rule="block_newton", engine="gauss_newton", hessian_every=2)
    with pytest.raises(ValueError, match="block_normalized' takes its damping relative.*estimator='gnb'"):
        SGDPH(groups, rule="block_normalized", engine="gauss_newton")
    with pytest.raises(ValueError, match="invalid cg_steps: 0"):
        SGDPH(groups, rule="block_newton", cg_steps=0)
    with pytest.raises(TypeError, match="block_max must be an integer"):
        SGDPH(groups, rule="block_newton", block_max=2.5)
    opt = SGDPH(groups, rule="block_newton")  # no model: GNB from the logits the closure returns
    x, y = batch_for(net)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward(create_graph=opt.is_second_order)
        return loss

    with pytest.raises(RuntimeError, match=r"return \(loss, logits\)"):
        opt.step(closure)
