"""The optimizer's contract (the algorithm block of its docstring), usage A and B, resume, edges."""

from __future__ import annotations

import copy
import gc
import io
import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sgdph_tools import SGDPH, sgdph_param_groups
from tests.conftest import batch_for, conv_bn_net

# ----------------------------------------------------------------------------- a problem with a known Hessian


class Quadratic(nn.Module):
    """L = ½aᵀAa + ½bᵀBb + bᵀWa + ½|W|² + ½|c - 1|²: the a- and b-blocks of the Hessian are A and B
    (not diagonal), so the rowsum estimates are exactly A·1 and B·1 at every point."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.a = nn.Parameter(torch.randn(3, generator=g, dtype=torch.float64))
        self.b = nn.Parameter(torch.randn(2, generator=g, dtype=torch.float64))
        self.W = nn.Parameter(torch.randn(2, 3, generator=g, dtype=torch.float64))
        self.c = nn.Parameter(torch.randn(2, generator=g, dtype=torch.float64))
        self.register_buffer(
            "A", torch.tensor([[2.0, 0.5, -0.3], [0.5, 1.0, 0.2], [-0.3, 0.2, 3.0]], dtype=torch.float64)
        )
        self.register_buffer("B", torch.tensor([[-1.5, 0.4], [0.4, 0.5]], dtype=torch.float64))  # indefinite

    def forward(self):
        a, b = self.a, self.b
        return (
            0.5 * a @ self.A @ a
            + 0.5 * b @ self.B @ b
            + b @ self.W @ a
            + 0.5 * self.W.square().sum()
            + 0.5 * (self.c - 1).square().sum()
        )


def reference_run(model: Quadratic, steps: int, *, lr, momentum, weight_decay, so_lr, alpha, eps, every):
    """The docstring's algorithm, written out literally. a, b second-order (round robin a, b, a, ...);
    W, c first-order (torch.optim.SGD with coupled weight decay)."""
    params = dict(model.named_parameters())
    buf = {k: None for k in params}
    D = {k: torch.zeros_like(params[k]) for k in "ab"}
    n = {k: 0 for k in "ab"}
    exact_rowsum = {"a": model.A.sum(1), "b": model.B.sum(1)}
    refreshes = 0
    for t in range(1, steps + 1):
        grads = dict(zip(params, torch.autograd.grad(model(), list(params.values()))))
        refresh = None
        if (t - 1) % every == 0:
            refresh = "ab"[refreshes % 2]
            refreshes += 1
        with torch.no_grad():
            for k, p in params.items():
                g = grads[k]
                if k in "Wc":
                    d = g + weight_decay * p
                    buf[k] = d.clone() if buf[k] is None else momentum * buf[k] + d
                    p -= lr * buf[k]
                    continue
                buf[k] = g.clone() if buf[k] is None else momentum * buf[k] + g
                if refresh == k:
                    D[k] = alpha * D[k] + (1 - alpha) * exact_rowsum[k].abs()
                    n[k] += 1
                if n[k] == 0:
                    p -= lr * (buf[k] + weight_decay * p)
                else:
                    p -= lr * (so_lr * buf[k] / (D[k] / (1 - alpha ** n[k]) + eps) + weight_decay * p)
    return D, n


HYPER = dict(lr=0.05, momentum=0.9, weight_decay=0.01, so_lr=0.02, alpha=0.8, eps=1e-3)


def quadratic_optimizer(model, every, foreach=False, **kw):
    groups = [
        {"params": [model.a, model.b], "second_order": True},
        {"params": [model.W, model.c], "second_order": False},
    ]
    return SGDPH(
        groups,
        lr=HYPER["lr"],
        momentum=HYPER["momentum"],
        weight_decay=HYPER["weight_decay"],
        so_lr=HYPER["so_lr"],
        hessian_momentum=HYPER["alpha"],
        eps=HYPER["eps"],
        hessian_every=every,
        foreach=foreach,
        rule="paper",  # the reference is Algorithm 1 (the default rule is "normalized" since the study)
        **kw,
    )


@pytest.mark.parametrize("every", [1, 2])
@pytest.mark.parametrize("usage", ["A", "B"])
@pytest.mark.parametrize("foreach", [False, True])
def test_update_matches_the_documented_algorithm(every, usage, foreach):
    model, reference = Quadratic(), Quadratic()
    D_ref, n_ref = reference_run(reference, 7, every=every, **HYPER)
    opt = quadratic_optimizer(model, every, foreach)
    for _ in range(7):
        if usage == "A":
            opt.zero_grad(set_to_none=True)
            model().backward(create_graph=True)
            opt.step()
        else:
            opt.step(loss_fn=model)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p, dict(reference.named_parameters())[name], rtol=1e-12, atol=1e-12)
    for k in "ab":
        state = opt.state[getattr(model, k)]
        assert state["hessian_refreshes"] == n_ref[k]
        torch.testing.assert_close(state["hessian_ema"], D_ref[k], rtol=1e-12, atol=1e-12)
    assert n_ref == ({"a": 4, "b": 3} if every == 1 else {"a": 2, "b": 2})


def test_before_the_first_refresh_the_step_is_sgd_without_decay_in_the_buffer():
    model = Quadratic()
    opt = quadratic_optimizer(model, every=100)
    opt.step(loss_fn=model)  # step 1 refreshes a only
    start = Quadratic()
    b0 = start.b.detach()
    (g,) = torch.autograd.grad(start(), [start.b])
    expected = b0 - HYPER["lr"] * (g + HYPER["weight_decay"] * b0)
    torch.testing.assert_close(model.b.detach(), expected)
    torch.testing.assert_close(opt.state[model.b]["momentum_buffer"], g)


# ----------------------------------------------------------------------------- first-order path


@pytest.mark.parametrize("foreach", [False, True])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_first_order_params_follow_torch_sgd_exactly(foreach, momentum):
    torch.manual_seed(0)
    net = conv_bn_net()
    twin = copy.deepcopy(net)
    opt = SGDPH(
        [{"params": net.parameters(), "second_order": False}],
        lr=0.1,
        momentum=momentum,
        weight_decay=1e-3,
        foreach=foreach,
    )
    ref = torch.optim.SGD(twin.parameters(), lr=0.1, momentum=momentum, weight_decay=1e-3, foreach=foreach)
    for step in range(5):
        x, y = batch_for(net, seed=step)
        for model, o in ((net, opt), (twin, ref)):
            o.zero_grad()
            F.cross_entropy(model(x), y).backward()
            o.step()
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), twin.parameters()))


def test_foreach_path_matches_single_tensor_path():
    torch.manual_seed(0)
    nets = [conv_bn_net(), None]
    nets[1] = copy.deepcopy(nets[0])
    opts = [
        SGDPH(sgdph_param_groups(n), lr=0.05, weight_decay=1e-3, estimator="hutchinson", foreach=f)
        for n, f in zip(nets, (False, True))
    ]
    for step in range(6):
        x, y = batch_for(nets[0], seed=step)
        for net, opt in zip(nets, opts):
            opt.step(loss_fn=lambda: F.cross_entropy(net(x), y))
    assert all(torch.equal(p, q) for p, q in zip(nets[0].parameters(), nets[1].parameters()))
    s0, s1 = opts[0].state_dict()["state"], opts[1].state_dict()["state"]
    for k in s0:
        if isinstance(k, int) and "hessian_ema" in s0[k]:
            assert torch.equal(s0[k]["hessian_ema"], s1[k]["hessian_ema"])


# ----------------------------------------------------------------------------- which params are second-order


def test_plain_params_use_the_authors_rule_last_1d_param_first_order():
    net = conv_bn_net()
    opt = SGDPH(net.parameters())
    second = [p for g in opt.param_groups if g["second_order"] for p in g["params"]]
    first = [p for g in opt.param_groups if not g["second_order"] for p in g["params"]]
    assert second == [net[1].weight, net[1].bias, net[4].weight, net[4].bias]
    assert any(p is net[-1].bias for p in first)  # the classifier bias: the last 1-D param


def test_the_classifier_bias_would_get_a_tenfold_step_as_second_order():
    """Why the rule matters: its rowsum Hessian is 0 (up to rounding), so under the paper's rule its
    step is so_lr/eps = 10 times SGD's. The default rule (normalized) reads only the curvature's shape
    within the tensor -- here rounding noise -- so the step stays within (1 + ε)/ε of SGD's."""
    torch.manual_seed(0)
    net = conv_bn_net().double()
    x, y = batch_for(net, dtype=torch.float64)
    bias = net[-1].bias
    start = bias.detach().clone()
    ratios = {}
    for rule in ("paper", None):
        with torch.no_grad():
            bias.copy_(start)
        opt = SGDPH([{"params": [bias], "second_order": True}], lr=0.1, momentum=0.0, rule=rule)
        opt.step(loss_fn=lambda: F.cross_entropy(net(x), y))  # first refresh happens at step 1
        assert opt.state[bias]["hessian_ema"].abs().max() < 1e-15
        ratios[rule] = (start - bias.detach()) / (0.1 * bias.grad)  # the step relative to SGD's
    torch.testing.assert_close(ratios["paper"], torch.full_like(start, 1e-3 / 1e-4))
    assert (ratios[None] >= 0).all() and (ratios[None] <= 1.3 / 0.3 + 1e-9).all()


# ----------------------------------------------------------------------------- usage errors


def test_usage_a_without_create_graph_is_a_clear_error():
    net = conv_bn_net()
    x, y = batch_for(net)
    opt = SGDPH(sgdph_param_groups(net))
    F.cross_entropy(net(x), y).backward()
    with pytest.raises(RuntimeError, match=r"create_graph=optimizer.is_second_order"):
        opt.step()


def test_finite_difference_without_a_closure_is_a_clear_error():
    net = conv_bn_net()
    x, y = batch_for(net)
    opt = SGDPH(sgdph_param_groups(net), engine="finite_difference")
    assert not opt.is_second_order and SGDPH(net.parameters()).is_second_order
    F.cross_entropy(net(x), y).backward(create_graph=opt.is_second_order)
    before = [p.detach().clone() for p in net.parameters()]
    with pytest.raises(RuntimeError, match=r"optimizer.step\(closure\)"):
        opt.step()
    assert all(torch.equal(p, b) for p, b in zip(net.parameters(), before))  # nothing moved
    with pytest.raises(ValueError, match="either a closure"):
        opt.step(lambda: None, loss_fn=lambda: None)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"lr": -1}, "invalid lr"),
        ({"hessian_momentum": 1.0}, "hessian_momentum"),
        ({"eps": 0}, "eps"),
        ({"hessian_every": 0}, "hessian_every"),
        ({"estimator": "diag"}, "unknown estimator"),
        ({"engine": "fd"}, "unknown engine"),
        ({"rule": "clip"}, "unknown rule"),
        ({"rule": "damped", "authors_code": True}, "rule='paper'"),
    ],
)
def test_invalid_hyperparameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SGDPH(conv_bn_net().parameters(), **kwargs)


def test_each_rule_has_its_own_default_eps_and_rules_are_per_group():
    net = conv_bn_net()
    assert [SGDPH(net.parameters(), rule=r).param_groups[0]["eps"] for r in ("paper", "damped", "normalized")] == [
        1e-4,
        0.3,
        0.3,
    ]
    # the default rule is the study's (docs/evidence.md); the authors' code implies the paper's
    assert (SGDPH(net.parameters()).param_groups[0]["rule"], SGDPH(net.parameters()).param_groups[0]["eps"]) == (
        "normalized",
        0.3,
    )
    assert SGDPH(net.parameters(), authors_code=True).param_groups[0]["rule"] == "paper"
    assert SGDPH(net.parameters(), rule="damped", eps=0.05).param_groups[0]["eps"] == 0.05
    groups = [{"params": [net[1].weight], "rule": "normalized"}, {"params": [net[1].bias]}]
    opt = SGDPH(groups, rule="damped")
    assert [(g["rule"], g["eps"]) for g in opt.param_groups] == [("normalized", 0.3), ("damped", 0.3)]
    with pytest.raises(ValueError, match="unknown rule"):
        SGDPH([{"params": [net[1].weight], "rule": "newton"}])


def test_closure_keeps_torch_meaning():
    net = conv_bn_net()
    x, y = batch_for(net)
    opt = SGDPH(sgdph_param_groups(net))

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(net(x), y)
        loss.backward(create_graph=True)
        return loss

    loss = opt.step(closure)
    assert loss.ndim == 0 and opt.state[net[1].weight]["hessian_refreshes"] == 1


def test_usage_a_frees_the_double_backward_graph():
    net = conv_bn_net()
    x, y = batch_for(net)
    opt = SGDPH(sgdph_param_groups(net))
    F.cross_entropy(net(x), y).backward(create_graph=True)
    opt.step()
    assert all(p.grad is None or not p.grad.requires_grad for p in net.parameters())


# ----------------------------------------------------------------------------- edge cases the authors' code crashes on


def run_steps(net, opt, steps, usage="B"):
    for step in range(steps):
        x, y = batch_for(net, seed=step)
        if usage == "B":
            opt.step(loss_fn=lambda: F.cross_entropy(net(x), y))
        else:
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward(create_graph=opt.is_second_order)
            opt.step()


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = conv_bn_net()
        self.unused = nn.BatchNorm2d(3)  # 1-D params that never get a gradient

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("usage", ["A", "B"])
def test_frozen_and_unused_params_are_skipped_and_round_robin_goes_on(usage):
    net = WithUnused()
    bn1 = net.body[1]
    bn1.weight.requires_grad_(False)
    frozen, unused = bn1.weight.detach().clone(), net.unused.weight.detach().clone()
    opt = SGDPH(sgdph_param_groups(net, include_frozen=True))
    run_steps(net, opt, 6, usage)
    assert torch.equal(bn1.weight, frozen) and torch.equal(net.unused.weight, unused)
    counts = [opt.state[p].get("hessian_refreshes", 0) for p in (bn1.bias, net.body[4].weight, net.body[4].bias)]
    assert counts == [2, 2, 2]  # 6 refreshes shared round robin by the 3 tensors that have grads


def test_momentum_zero_and_several_groups_with_their_own_hyperparameters():
    net = conv_bn_net()
    second, first = sgdph_param_groups(net)
    second.update(lr=0.0)  # second-order params frozen through their group's lr
    first.update(momentum=0.0, weight_decay=1e-2)
    opt = SGDPH([second, first], lr=0.1)
    before = [p.detach().clone() for p in second["params"]]
    run_steps(net, opt, 3)
    assert all(torch.equal(p, b) for p, b in zip(second["params"], before))
    assert all("momentum_buffer" not in opt.state[p] for p in first["params"])
    # lr=0 freezes the values, not the Hessian schedule: one rowsum refresh per step, round robin.
    assert [opt.state[p]["hessian_refreshes"] for p in second["params"]] == [1, 1, 1, 0]


@pytest.mark.parametrize("usage", ["A", "B"])
def test_a_model_without_1d_params(usage):
    net = nn.Sequential(nn.Conv2d(2, 3, 3, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(27, 3, bias=False))
    opt = SGDPH(net.parameters())
    assert [g["second_order"] for g in opt.param_groups] == [False]
    before = net[0].weight.detach().clone()
    run_steps(net, opt, 2, usage)
    assert not torch.equal(net[0].weight, before)


def test_hutchinson_refreshes_every_tensor_on_refreshing_steps():
    net = conv_bn_net()
    opt = SGDPH(sgdph_param_groups(net), estimator="hutchinson", hessian_every=3)
    run_steps(net, opt, 7)  # refreshing steps: 1, 4, 7
    assert [opt.state[p]["hessian_refreshes"] for p in opt.param_groups[0]["params"]] == [3, 3, 3, 3]
    assert [opt.state[p]["step"].item() for p in opt.param_groups[0]["params"]] == [7.0] * 4


# ----------------------------------------------------------------------------- resume


def train(net, opt, steps, start, usage):
    for step in range(start, start + steps):
        x, y = batch_for(net, seed=step)
        if usage == "A":
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward(create_graph=True)
            opt.step()
        else:
            opt.step(loss_fn=lambda: F.cross_entropy(net(x), y))


@pytest.mark.parametrize(
    "usage,options",
    [
        ("A", dict(estimator="rowsum")),
        ("B", dict(estimator="hutchinson", hessian_every=2)),
        ("B", dict(estimator="rowsum", engine="finite_difference")),
    ],
)
def test_resume_from_state_dict_matches_an_uninterrupted_run_bit_for_bit(usage, options):
    def fresh():
        torch.manual_seed(0)
        net = conv_bn_net(dropout=0.2)
        return net, SGDPH(sgdph_param_groups(net), lr=0.05, weight_decay=1e-3, **options)

    net, opt = fresh()
    torch.manual_seed(1)
    train(net, opt, 8, 0, usage)

    net2, opt2 = fresh()
    torch.manual_seed(1)
    train(net2, opt2, 4, 0, usage)
    blob = io.BytesIO()
    torch.save({"model": net2.state_dict(), "opt": opt2.state_dict(), "rng": torch.get_rng_state()}, blob)
    blob.seek(0)
    saved = torch.load(blob, weights_only=True)
    net3, opt3 = fresh()
    net3.load_state_dict(saved["model"])
    opt3.load_state_dict(saved["opt"])
    torch.set_rng_state(saved["rng"])
    train(net3, opt3, 4, 4, usage)

    for (name, p), q in zip(net.state_dict().items(), net3.state_dict().values()):
        assert torch.equal(p, q), name
    s, s3 = opt.state_dict()["state"], opt3.state_dict()["state"]
    assert s.keys() == s3.keys()
    for k in s:
        for key, value in s[k].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(s3[k][key])), (k, key)


# ----------------------------------------------------------------------------- AMP


def scaled_run(usage, scaler, unscale_first=False):
    """Three steps in usage A (a standard loop; ``unscale_first``: the caller unscales to clip before
    scaler.step, as timm's NativeScaler does) or B (``loss_fn``, the scaler handed to step)."""
    torch.manual_seed(0)
    net = conv_bn_net()
    opt = SGDPH(sgdph_param_groups(net), lr=0.05, estimator="hutchinson")
    for step in range(3):
        x, y = batch_for(net, seed=step)
        if usage == "A":
            opt.zero_grad(set_to_none=True)
            loss = F.cross_entropy(net(x), y)
            if scaler is None:
                loss.backward(create_graph=True)
                opt.step()
            else:
                scaler.scale(loss).backward(create_graph=True)
                if unscale_first:
                    scaler.unscale_(opt)
                    torch.nn.utils.clip_grad_norm_(net.parameters(), 1e3)  # large: clips nothing
                scaler.step(opt)
                scaler.update()
        else:
            opt.step(loss_fn=lambda: F.cross_entropy(net(x), y), scaler=scaler)
            if scaler is not None:
                scaler.update()
    return net, opt


@pytest.mark.parametrize("usage", ["A", "B"])
def test_grad_scaler_hessian_is_unscaled(usage):
    net, opt = scaled_run(usage, None)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    net_s, opt_s = scaled_run(usage, scaler)
    for p, q in zip(opt.param_groups[0]["params"], opt_s.param_groups[0]["params"]):
        D, D_s = opt.state[p]["hessian_ema"], opt_s.state[q]["hessian_ema"]
        assert D.abs().max() > 1e-4  # a real estimate, not zeros
        torch.testing.assert_close(D_s, D, rtol=1e-4, atol=1e-7)
    for p, q in zip(net.parameters(), net_s.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6)


def test_a_grad_scaler_loop_uses_torchs_protocol_and_unscales_the_hessian():
    """scaler.scale(loss).backward(); scaler.step(opt); scaler.update() -- also with scaler.unscale_(opt)
    first, to clip -- emits no FutureWarning (torch's grad_scale / found_inf protocol, not its
    deprecated path) and gives the Hessian EMA of the run without a scaler."""
    _, reference = scaled_run("A", None)
    for unscale_first in (False, True):
        with warnings.catch_warnings():
            warnings.simplefilter("error", FutureWarning)
            _, scaled = scaled_run("A", torch.amp.GradScaler("cpu", init_scale=2.0**12), unscale_first)
        for p, q in zip(reference.param_groups[0]["params"], scaled.param_groups[0]["params"]):
            D, D_s = reference.state[p]["hessian_ema"], scaled.state[q]["hessian_ema"]
            assert D.abs().max() > 1e-4
            torch.testing.assert_close(D_s, D, rtol=1e-4, atol=1e-7)
        assert not hasattr(scaled, "grad_scale") and not hasattr(scaled, "found_inf")  # torch removed them


def test_the_old_grad_scaler_keyword_still_works_with_a_notice():
    net = conv_bn_net()
    x, y = batch_for(net)
    opt = SGDPH(sgdph_param_groups(net))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    with pytest.warns(FutureWarning, match=r"step\(scaler=\.\.\.\)"):
        opt.step(loss_fn=lambda: F.cross_entropy(net(x), y) * float("inf"), grad_scaler=scaler)
    scaler.update()
    assert scaler.get_scale() == 2.0**11  # the scaler saw the inf through the old keyword
    with pytest.raises(TypeError, match="unexpected keyword argument 'scalar'"):
        opt.step(loss_fn=lambda: F.cross_entropy(net(x), y), scalar=scaler)


def test_grad_scaler_skips_a_step_with_non_finite_gradients():
    net = conv_bn_net()
    x, y = batch_for(net)
    opt = SGDPH(sgdph_param_groups(net))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    before = copy.deepcopy(net.state_dict())
    opt.step(loss_fn=lambda: F.cross_entropy(net(x), y) * float("inf"), scaler=scaler)
    scaler.update()
    assert scaler.get_scale() == 2.0**11
    params_before = {k: v for k, v in before.items() if "running" not in k and "num_batches" not in k}
    assert all(torch.equal(net.state_dict()[k], v) for k, v in params_before.items())
    assert all(opt.state[p]["step"] == 0 for p in opt.param_groups[0]["params"])  # no step was counted


def test_finite_differences_on_a_compiled_model_restore_the_given_buffers():
    """torch.compile'd modules skip global forward hooks: the optimizer finds the buffers through model=."""
    torch.manual_seed(0)
    net = conv_bn_net()
    compiled = torch.compile(net)
    opt = SGDPH(sgdph_param_groups(net), engine="finite_difference", model=compiled)
    for step in range(2):
        x, y = batch_for(net, seed=step)
        opt.step(loss_fn=lambda: F.cross_entropy(compiled(x), y))
    assert net[1].num_batches_tracked.item() == 2  # one real forward per step, not two


# ----------------------------------------------------------------------------- lifecycle


def test_the_models_hook_goes_with_the_optimizer():
    """SGDPH(model=...) records the model's inputs with a forward pre-hook; the hook holds no reference
    to the optimizer, and collecting the optimizer (or close()) removes it."""
    net = conv_bn_net()
    x, y = batch_for(net)
    opt = SGDPH(sgdph_param_groups(net), estimator="gnb", gnb_fraction=0.5, model=net)
    opt.step(loss_fn=lambda: F.cross_entropy(net(x), y))
    assert len(net._forward_pre_hooks) == 1
    del opt
    gc.collect()
    assert len(net._forward_pre_hooks) == 0
    opt = SGDPH(sgdph_param_groups(net), estimator="gnb", gnb_fraction=0.5, model=net)
    opt.close()
    opt.close()  # idempotent
    assert len(net._forward_pre_hooks) == 0
