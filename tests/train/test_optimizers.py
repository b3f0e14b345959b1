from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import sgdph_tools  # noqa: F401
from sgdph_tools import SGDPH
from sgdph_tools.recipe import OptimizerCfg, ScheduleCfg
from sgdph_tools.train.optimizers import build_optimizer, build_scheduler, lr_factor

SOURCES = {
    "sgdph": "SGDPH",
    "sgd": "SGD",
    "adam": "Adam",
    "adamw": "AdamW",
    "adabelief": "AdaBelief",
    "adahessian": "Adahessian",
    "apollo": "ApolloDQN",
}


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_named_optimizer_builds_and_steps(name):
    torch.manual_seed(0)
    model = timm.create_model("small_cnn", num_classes=3, in_chans=1)
    opt = build_optimizer(OptimizerCfg(name=name, lr=1e-3, weight_decay=1e-4), model)
    assert type(opt).__name__ == SOURCES[name]
    assert all(g["weight_decay"] == 1e-4 for g in opt.param_groups)  # 1-D params decay too, as in the paper
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 3, (4,))
    if isinstance(opt, SGDPH):
        opt.step(loss_fn=lambda: F.cross_entropy(model(x), y))
    else:
        F.cross_entropy(model(x), y).backward(create_graph=getattr(opt, "is_second_order", False))
        opt.step()
    assert any(not torch.equal(b, p) for b, p in zip(before, model.parameters()))


def test_sgd_is_plain_momentum_and_sgdph_gets_its_options():
    model = timm.create_model("small_cnn", num_classes=3, in_chans=1)
    sgd = build_optimizer(OptimizerCfg(name="sgd", lr=0.1, momentum=0.8), model)
    assert sgd.param_groups[0]["nesterov"] is False and sgd.param_groups[0]["momentum"] == 0.8
    ph = build_optimizer(
        OptimizerCfg(
            name="sgdph",
            so_lr=2e-3,
            estimator="hutchinson",
            engine="finite_difference",
            hessian_every=4,
            eps=1e-5,
            second_order_kinds=["norm_weight"],
        ),
        model,
    )
    assert (ph.estimator, ph.engine, ph.hessian_every) == ("hutchinson", "finite_difference", 4)
    assert ph.param_groups[0]["so_lr"] == 2e-3 and ph.param_groups[0]["eps"] == 1e-5
    assert all(n.endswith("1.weight") for n in ph.param_groups[0]["param_names"])


def test_schedules():
    step = ScheduleCfg(name="multistep", milestones=[2, 4], gamma=0.1)
    assert [lr_factor(step, e, 6, 0.1) for e in (0, 1.99, 2, 4.5)] == pytest.approx([1, 1, 0.1, 0.01])
    cos = ScheduleCfg(name="cosine", min_lr=0.001)
    assert [lr_factor(cos, e, 10, 0.1) for e in (0, 5, 10)] == pytest.approx([1, 0.505, 0.01])
    warm = ScheduleCfg(name="constant", warmup_epochs=2, warmup_factor=0.1)
    assert [lr_factor(warm, e, 10, 0.1) for e in (0, 1, 2)] == pytest.approx([0.1, 0.55, 1])
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    sched = build_scheduler(step, opt, 6, iters_per_epoch=10, base_lr=0.1)
    for _ in range(20):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01)  # iteration 20 = epoch 2: first milestone


def test_authors_code_recipe_builds_the_authors_rule_on_plain_parameters():
    model = timm.create_model("small_cnn", num_classes=3, in_chans=1)
    opt = build_optimizer(OptimizerCfg(name="sgdph", authors_code=True), model)
    assert opt.authors_code and opt.model is model
    one_d = [p for p in model.parameters() if p.ndim == 1]
    second = [p for g in opt.param_groups if g["second_order"] for p in g["params"]]
    assert len(second) == len(one_d) - 1 and all(p is q for p, q in zip(second, one_d))


def test_authors_code_rejects_settings_it_does_not_take():
    from sgdph_tools.errors import UserError
    from sgdph_tools.recipe import recipe_from_dict

    with pytest.raises(UserError, match="authors' rule"):
        recipe_from_dict({"optimizer": {"authors_code": True, "estimator": "hutchinson"}})
    with pytest.raises(UserError, match="rule=paper"):
        recipe_from_dict({"optimizer": {"authors_code": True, "rule": "damped"}})
    # the default rule (normalized: what a recorded recipe lists) is read as the paper's there
    model = timm.create_model("small_cnn", num_classes=3, in_chans=1)
    cfg = recipe_from_dict({"optimizer": {"authors_code": True, "rule": "normalized"}}).optimizer
    assert build_optimizer(cfg, model).param_groups[0]["rule"] == "paper"


@pytest.mark.parametrize("rule,eps,expected_eps", [("damped", None, 0.3), ("normalized", 0.5, 0.5)])
def test_a_recipe_rule_reaches_every_second_order_group(rule, eps, expected_eps):
    from sgdph_tools.recipe import recipe_from_dict

    model = timm.create_model("small_cnn", num_classes=3, in_chans=1)
    cfg = recipe_from_dict({"optimizer": {"rule": rule, "eps": eps}}).optimizer
    opt = build_optimizer(cfg, model)
    assert {(g["rule"], g["eps"]) for g in opt.param_groups} == {(rule, expected_eps)}


@pytest.mark.parametrize("name", ["sgd", "adamw", "sgdph"])
def test_weight_decay_1d_gives_the_1d_parameters_their_own_decay(name):
    model = timm.create_model("small_cnn", num_classes=3, in_chans=1)
    one_d = {id(p) for p in model.parameters() if p.ndim <= 1}
    opt = build_optimizer(OptimizerCfg(name=name, lr=0.1, weight_decay=5e-4, weight_decay_1d=0.0), model)
    seen = set()
    for group in opt.param_groups:
        kinds = {id(p) in one_d for p in group["params"]}
        assert len(kinds) == 1  # no group mixes 1-D parameters with kernels
        assert group["weight_decay"] == (0.0 if kinds.pop() else 5e-4)
        seen |= {id(p) for p in group["params"]}
    assert seen == {id(p) for p in model.parameters()}
    if name == "sgdph":  # the second-order flags survive the split: every channel-wise 1-D param keeps its step
        second = [n for g in opt.param_groups if g["second_order"] for n in g["param_names"]]
        plain = build_optimizer(OptimizerCfg(name=name, lr=0.1, weight_decay=5e-4), model)
        assert sorted(second) == sorted(plain.param_groups[0]["param_names"])
