"""``BlockHessianFree`` against independent truths in float64: each block's step against a solve with
the block of a brute-force GGN (Jacobians), the Levenberg-Marquardt rule against the loss and the
block-diagonal model computed here, backtracking, momentum, the curvature mini-batch; what the extra
forwards leave behind (BatchNorm buffers, RNG), resume, DDP against one process, and the errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from sgdph_tools.optim.block_hf import (
    DAMPING_DOWN,
    DAMPING_MAX,
    DAMPING_MIN,
    DAMPING_UP,
    RHO_HIGH,
    RHO_LOW,
    BlockHessianFree,
)
from tests.conftest import batch_for, conv_bn_net, join_gloo
from tests.curvature.test_gauss_newton import brute_force_ggn


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3))


def closure_for(opt, net, x, y):
    def closure():
        opt.zero_grad()
        logits = net(x)
        loss = F.cross_entropy(logits, y)
        loss.backward()
        return loss, logits

    return closure


def loss_at(net, x, y) -> float:
    with torch.no_grad():
        return float(F.cross_entropy(net(x), y))


def solve(G, g, lam):
    return torch.linalg.solve(G + lam * torch.eye(len(G), dtype=G.dtype), g)


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def test_one_block_step_is_the_damped_newton_step():
    """A linear softmax classifier (one block: weight and bias), λ fixed, CG to convergence:
    Δθ = −lr·(G + λI)⁻¹ g with G the brute-force GGN."""
    torch.manual_seed(0)
    net = nn.Linear(5, 3).double()
    x, y = batch_for(net, n=16, dtype=torch.float64)
    lr, lam = 0.7, 0.1
    opt = BlockHessianFree(net, lr=lr, damping=lam, adapt_damping=False, cg_max_iters=50, cg_tol=1e-14)
    assert len(opt.param_groups) == 1
    params = list(net.parameters())
    G, logits = brute_force_ggn(net, x, params)
    g = flat(torch.autograd.grad(F.cross_entropy(logits, y), params))
    expected = flat(params).detach() - lr * solve(G, g, lam)
    opt.step(closure_for(opt, net, x, y))
    torch.testing.assert_close(flat(params).detach(), expected, rtol=1e-9, atol=1e-11)
    assert opt.damping == lam  # fixed
    assert opt.last_step["loss_after"] is None  # no second evaluation without adaptation


def test_each_block_solves_its_own_block_only():
    """Two layers, two blocks: each block's step is its own block's solve; the cross-block curvature
    (which the full GGN has) is ignored -- and the full solve would give a different step."""
    torch.manual_seed(1)
    net = mlp().double()
    x, y = batch_for(net, n=12, dtype=torch.float64)
    lr, lam, wd = 1.0, 0.05, 0.01
    opt = BlockHessianFree(net, lr=lr, damping=lam, adapt_damping=False, cg_max_iters=60, cg_tol=1e-14, weight_decay=wd)
    assert [g["block"] for g in opt.param_groups] == ["0", "2"]
    params = list(net.parameters())
    G, logits = brute_force_ggn(net, x, params)
    g = flat(torch.autograd.grad(F.cross_entropy(logits, y), params)) + wd * flat(params).detach()
    n1 = params[0].numel() + params[1].numel()
    # weight decay is part of the objective: its gradient wθ and its curvature wI
    expected = torch.cat([solve(G[:n1, :n1], g[:n1], lam + wd), solve(G[n1:, n1:], g[n1:], lam + wd)])
    full = solve(G, g, lam + wd)
    assert (expected - full).norm() > 1e-3 * full.norm()  # the blocks are coupled: the test can tell
    before = flat(params).detach().clone()
    opt.step(closure_for(opt, net, x, y))
    torch.testing.assert_close(before - flat(params).detach(), lr * expected, rtol=1e-8, atol=1e-11)
    # the solution is kept for the next step's warm start
    torch.testing.assert_close(flat(opt.state[p]["cg_solution"] for p in params), -expected, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("lam", [1e-4, 0.1, 100.0])
def test_levenberg_marquardt_rule_and_rejected_steps(lam):
    """With s the block solves (computed here from the brute-force GGN): ρ = (f(θ + s) − f(θ)) /
    (gᵀs + ½ Σ_b s_bᵀG_bb s_b); λ·3/2 below ¼, λ·2/3 above ¾; a step that raises the loss is taken
    back, bit for bit."""
    torch.manual_seed(2)
    net = mlp().double()
    x, y = batch_for(net, n=12, dtype=torch.float64)
    opt = BlockHessianFree(net, lr=1.0, damping=lam, cg_max_iters=60, cg_tol=1e-14)
    params = list(net.parameters())
    G, logits = brute_force_ggn(net, x, params)
    g = flat(torch.autograd.grad(F.cross_entropy(logits, y), params))
    n1 = params[0].numel() + params[1].numel()
    s = -torch.cat([solve(G[:n1, :n1], g[:n1], lam), solve(G[n1:, n1:], g[n1:], lam)])
    twin = mlp().double()
    twin.load_state_dict(net.state_dict())
    torch.nn.utils.vector_to_parameters(flat(twin.parameters()).detach() + s, twin.parameters())
    f0, f1 = loss_at(net, x, y), loss_at(twin, x, y)
    model = float(g @ s) + 0.5 * float(s[:n1] @ G[:n1, :n1] @ s[:n1] + s[n1:] @ G[n1:, n1:] @ s[n1:])
    rho = (f1 - f0) / model
    before = flat(params).detach().clone()
    opt.step(closure_for(opt, net, x, y))
    assert opt.last_step["loss"] == pytest.approx(f0, rel=1e-12)
    assert opt.last_step["loss_after"] == pytest.approx(f1, rel=1e-10)
    assert opt.last_step["rho"] == pytest.approx(rho, rel=1e-6)
    factor = DAMPING_UP if rho < RHO_LOW else DAMPING_DOWN if rho > RHO_HIGH else 1.0
    assert opt.damping == pytest.approx(lam * factor, rel=1e-12)
    assert opt.last_step["rejected"] == (rho < 0)
    if rho < 0:
        assert torch.equal(flat(params).detach(), before)
    else:
        torch.testing.assert_close(flat(params).detach() - before, s, rtol=1e-8, atol=1e-11)
    if lam == 1e-4:  # a nearly undamped Newton step on a nonlinear net over-promises: taken back
        assert rho < 0
    if lam == 100.0:  # a tiny step: the quadratic model is accurate
        assert rho > RHO_HIGH


def test_a_step_to_a_non_finite_loss_is_taken_back():
    """The loss at the new parameters overflows (here: the closure says so on its second call): the
    parameters are put back bit for bit, λ rises, the warm start is not replaced."""
    torch.manual_seed(9)
    net = mlp().double()
    x, y = batch_for(net, n=12, dtype=torch.float64)
    opt = BlockHessianFree(net, damping=5.0, cg_max_iters=5)
    calls = []

    def closure():
        calls.append(1)
        loss, logits = closure_for(opt, net, x, y)()
        return (loss * float("nan") if len(calls) == 2 else loss), logits

    before = [p.detach().clone() for p in net.parameters()]
    opt.step(closure)
    assert len(calls) == 2 and opt.last_step["rejected"] and opt.last_step["rho"] == -math.inf
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))
    assert opt.damping == pytest.approx(5.0 * DAMPING_UP)
    assert all("cg_solution" not in opt.state[p] for p in net.parameters())
    opt.step(closure)  # its calls are the third and fourth: finite, accepted
    assert not opt.last_step["rejected"] and not torch.equal(next(net.parameters()), before[0])


def test_damping_stays_within_its_bounds():
    """Every step rejected (the re-evaluated loss is always higher) raises λ x3/2 per step until it
    reaches DAMPING_MAX and stays there; every step accepted with ρ ≈ 1 lowers it to DAMPING_MIN.
    Unbounded, the first overflowed float32 after ~220 steps (a dead network on shapes)."""
    torch.manual_seed(9)
    net = mlp().double()
    x, y = batch_for(net, n=12, dtype=torch.float64)
    for start, worse, bound in ((1e6, True, DAMPING_MAX), (1e-6, False, DAMPING_MIN)):
        opt = BlockHessianFree(net, damping=start, cg_max_iters=3)
        calls = []

        def closure():
            calls.append(1)
            loss, logits = closure_for(opt, net, x, y)()
            return (loss + 1.0 if worse and len(calls) % 2 == 0 else loss), logits

        lows = []
        for _ in range(math.ceil(math.log(DAMPING_MAX / start) / math.log(DAMPING_UP)) + 3 if worse else 200):
            opt.step(closure)
            assert DAMPING_MIN <= opt.damping <= DAMPING_MAX
            lows.append(opt.damping == DAMPING_MIN)
        if worse:
            assert opt.last_step["rejected"] and opt.damping == bound
        else:  # on this easy batch most steps have ρ > 3/4: λ reaches its floor (and stays at or above it)
            assert any(lows)


@pytest.mark.parametrize("lam", [1e-3, 0.3])
def test_backtracking_takes_the_best_kept_iterate_going_back(lam, monkeypatch):
    """Martens' rule: losses at the kept CG iterates from the last one backwards; the step is the
    last candidate before the loss stops decreasing -- never worse than the final iterate."""
    torch.manual_seed(3)
    net = mlp().double()
    x, y = batch_for(net, n=12, dtype=torch.float64)
    opt = BlockHessianFree(net, damping=lam, adapt_damping=False, cg_max_iters=30, cg_tol=1e-14, backtracking=True)
    # the final iterate, from an optimizer without backtracking on the same parameters
    twin = mlp().double()
    twin.load_state_dict(net.state_dict())
    plain = BlockHessianFree(twin, damping=lam, adapt_damping=False, cg_max_iters=30, cg_tol=1e-14)
    plain.step(closure_for(plain, twin, x, y))
    evaluated = []
    loss_at_candidate = BlockHessianFree._loss_at
    monkeypatch.setattr(
        BlockHessianFree, "_loss_at", lambda *a: evaluated.append(loss_at_candidate(*a)) or evaluated[-1]
    )
    f0, before = loss_at(net, x, y), flat(net.parameters()).detach().clone()
    opt.step(closure_for(opt, net, x, y))
    assert evaluated[0] == pytest.approx(loss_at(twin, x, y), rel=1e-12)  # the last iterate first
    i = evaluated.index(min(evaluated))
    assert opt.last_step["loss_after"] == pytest.approx(evaluated[i], rel=1e-12)
    assert all(a > b for a, b in zip(evaluated[:i], evaluated[1 : i + 1]))  # decreasing up to the choice
    assert i == len(evaluated) - 1 or evaluated[i + 1] >= evaluated[i]  # stopped where it rose
    assert opt.last_step["rejected"] == (evaluated[i] > f0)
    if opt.last_step["rejected"]:  # even the best candidate raised the loss: taken back
        assert torch.equal(flat(net.parameters()).detach(), before)
    else:
        assert loss_at(net, x, y) == pytest.approx(evaluated[i], rel=1e-12)
    if lam == 1e-3:  # nearly undamped: every candidate overshoots
        assert opt.last_step["rejected"]
    if lam == 0.3:
        assert len(evaluated) > 1 and not opt.last_step["rejected"]


def test_momentum_is_a_heavy_ball_over_solved_directions():
    torch.manual_seed(4)
    net = mlp().double()
    x, y = batch_for(net, n=12, dtype=torch.float64)
    lr, mu = 0.5, 0.8
    opt = BlockHessianFree(net, lr=lr, momentum=mu, damping=0.5, adapt_damping=False, cg_max_iters=60, cg_tol=1e-14)
    params = list(net.parameters())
    closure = closure_for(opt, net, x, y)
    opt.step(closure)
    v1 = flat(opt.state[p]["cg_solution"] for p in params).clone()
    before = flat(params).detach().clone()
    opt.step(closure)
    d2 = flat(opt.state[p]["cg_solution"] for p in params)
    torch.testing.assert_close(flat(params).detach() - before, lr * (mu * v1 + d2), rtol=1e-10, atol=1e-12)


def test_curvature_mini_batch_is_the_leading_rows():
    """curvature_fraction: G from the first rows of the batch, the gradient from all of it."""
    torch.manual_seed(5)
    net = nn.Linear(5, 3).double()
    x, y = batch_for(net, n=16, dtype=torch.float64)
    lr, lam = 1.0, 0.2
    opt = BlockHessianFree(
        net, lr=lr, damping=lam, adapt_damping=False, cg_max_iters=50, cg_tol=1e-14, curvature_fraction=0.25
    )
    params = list(net.parameters())
    G, _ = brute_force_ggn(net, x[:4], params)
    g = flat(torch.autograd.grad(F.cross_entropy(net(x), y), params))
    expected = flat(params).detach() - lr * solve(G, g, lam)
    opt.step(closure_for(opt, net, x, y))
    torch.testing.assert_close(flat(params).detach(), expected, rtol=1e-9, atol=1e-11)


def test_extra_forwards_leave_buffers_and_rng_as_one_closure_call_does():
    """The curvature forward and the loss re-evaluation restore BatchNorm's buffers and the RNG
    (dropout): the training run sees exactly one forward per step."""
    torch.manual_seed(6)
    net = conv_bn_net(dropout=0.2)
    reference = conv_bn_net(dropout=0.2)
    reference.load_state_dict(net.state_dict())
    x, y = batch_for(net, n=8)
    opt = BlockHessianFree(net, cg_max_iters=3, backtracking=True)
    torch.manual_seed(11)
    opt.step(closure_for(opt, net, x, y))
    after_step = torch.get_rng_state()
    torch.manual_seed(11)
    F.cross_entropy(reference(x), y).backward()
    assert torch.equal(after_step, torch.get_rng_state())
    for (name, a), b in zip(net.named_buffers(), reference.buffers()):
        assert torch.equal(a, b), name


def test_resume_is_bit_exact(tmp_path):
    def run(steps, start_state=None, model_state=None):
        torch.manual_seed(7)
        net = conv_bn_net()
        if model_state is not None:
            net.load_state_dict(model_state)
        opt = BlockHessianFree(net, momentum=0.5, cg_max_iters=4, curvature_fraction=0.5)
        if start_state is not None:
            opt.load_state_dict(start_state)
        for step in steps:
            x, y = batch_for(net, n=8, seed=step)
            opt.step(closure_for(opt, net, x, y))
        return net, opt

    straight, _ = run(range(4))
    half, opt = run(range(2))
    torch.save({"model": half.state_dict(), "optim": opt.state_dict()}, tmp_path / "ck.pt")
    saved = torch.load(tmp_path / "ck.pt", weights_only=True)
    resumed, opt2 = run(range(2, 4), saved["optim"], saved["model"])
    assert opt2.state[next(iter(resumed.parameters()))]["step"] == 4
    for a, b in zip(straight.state_dict().values(), resumed.state_dict().values()):
        assert torch.equal(a, b)


def test_trains_a_conv_bn_net():
    torch.manual_seed(8)
    net = conv_bn_net()
    x, y = batch_for(net, n=32)
    opt = BlockHessianFree(net, cg_max_iters=8)
    closure = closure_for(opt, net, x, y)
    first = float(opt.step(closure))
    for _ in range(10):
        last = float(opt.step(closure))
    assert last < 0.5 * first


def test_errors():
    net = mlp()
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        BlockHessianFree(list(net.parameters()))
    with pytest.raises(ValueError, match="invalid damping: 0"):
        BlockHessianFree(net, damping=0)
    with pytest.raises(ValueError, match="invalid cg_max_iters"):
        BlockHessianFree(net, cg_max_iters=0)
    with pytest.raises(ValueError, match="invalid curvature_fraction"):
        BlockHessianFree(net, curvature_fraction=1.5)
    with pytest.raises(TypeError, match="lr must be a number"):
        BlockHessianFree(net, lr="1")
    with pytest.raises(ValueError, match=r"blocks leave out trainable parameters \['2.weight'"):
        BlockHessianFree(net, blocks=[list(net[0].parameters())])
    with pytest.raises(TypeError, match="not one tensor"):
        BlockHessianFree(net, blocks=[net[0].weight])
    with pytest.raises(ValueError, match="not a parameter of model"):
        BlockHessianFree(net, blocks=[list(net.parameters()), [nn.Parameter(torch.ones(2))]])
    opt = BlockHessianFree(net, blocks=[{"params": list(net.parameters()), "lr": 0.5}])
    assert len(opt.param_groups) == 1 and opt.param_groups[0]["lr"] == 0.5
    with pytest.raises(RuntimeError, match="needs a closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="has not run a forward in train mode"):
        opt.step(lambda: torch.tensor(1.0, requires_grad=True))


# ------------------------------------------------------------------------------------------- DDP

WORLD = 2


def ddp_worker(rank: int, port: int, out_dir: str) -> None:
    join_gloo(rank, port, WORLD)
    try:
        torch.manual_seed(0)
        net = mlp().double()
        ddp = nn.parallel.DistributedDataParallel(net)
        opt = BlockHessianFree(ddp, cg_max_iters=20, cg_tol=1e-12, backtracking=True)
        for step in range(3):
            x, y = batch_for(net, n=16, dtype=torch.float64, seed=step)
            shard = slice(8 * rank, 8 * rank + 8)
            opt.step(closure_for(opt, ddp, x[shard], y[shard]))
        torch.save({"params": [p.detach() for p in net.parameters()], "damping": opt.damping}, f"{out_dir}/r{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_ddp_averages_products_and_losses_like_one_process_on_the_whole_batch(tmp_path, free_port):
    mp.spawn(ddp_worker, args=(free_port, str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"r{r}.pt", weights_only=False) for r in range(WORLD))
    torch.manual_seed(0)
    net = mlp().double()
    opt = BlockHessianFree(net, cg_max_iters=20, cg_tol=1e-12, backtracking=True)
    for step in range(3):
        x, y = batch_for(net, n=16, dtype=torch.float64, seed=step)
        opt.step(closure_for(opt, net, x, y))
    for a, b, single in zip(r0["params"], r1["params"], net.parameters()):
        assert torch.equal(a, b)
        torch.testing.assert_close(a, single.detach(), rtol=1e-8, atol=1e-10)
    assert r0["damping"] == pytest.approx(opt.damping)
