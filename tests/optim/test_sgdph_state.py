"""State that survives every checkpointing path: torch's state_dict, torch.distributed.checkpoint's
get/set_optimizer_state_dict, optimizer-wide settings carried in the param groups, 0.1 checkpoints."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from sgdph_tools import SGDPH, sgdph_param_groups
from tests.conftest import batch_for, conv_bn_net

OPTIONS = [
    dict(estimator="rowsum"),
    dict(estimator="hutchinson", hessian_every=2),
    dict(engine="finite_difference"),
    dict(authors_code=True),
]
IDS = ["rowsum", "hutchinson-every2", "fd", "authors"]


def fresh(options):
    torch.manual_seed(0)
    net = conv_bn_net(dropout=0.2)
    params = net.parameters() if options.get("authors_code") else sgdph_param_groups(net)
    return net, SGDPH(params, lr=0.05, weight_decay=1e-3, model=net, **options)


def train(net, opt, start, steps):
    for step in range(start, start + steps):
        x, y = batch_for(net, seed=step)
        opt.step(loss_fn=lambda: F.cross_entropy(net(x), y))


@pytest.mark.parametrize("options", OPTIONS, ids=IDS)
def test_distributed_checkpoint_round_trip_continues_identically(options):
    """get_optimizer_state_dict / set_optimizer_state_dict (what FSDP and DCP users call)."""
    net, opt = fresh(options)
    torch.manual_seed(1)
    train(net, opt, 0, 6)

    net2, opt2 = fresh(options)
    torch.manual_seed(1)
    train(net2, opt2, 0, 3)
    saved_model = {k: v.clone() for k, v in net2.state_dict().items()}
    saved_opt = get_optimizer_state_dict(net2, opt2)
    assert all(isinstance(k, str) and k in dict(net2.named_parameters()) for k in saved_opt["state"])
    rng = torch.get_rng_state()

    net3, opt3 = fresh(options)  # a fresh optimizer: DCP must not need a step to initialise it
    net3.load_state_dict(saved_model)
    set_optimizer_state_dict(net3, opt3, saved_opt)
    torch.set_rng_state(rng)
    train(net3, opt3, 3, 3)
    for (name, p), q in zip(net.state_dict().items(), net3.state_dict().values()):
        assert torch.equal(p, q), name


def test_state_is_per_parameter_only_and_settings_travel_in_the_groups():
    net, opt = fresh(dict(estimator="hutchinson", hessian_every=3, seed=7))
    train(net, opt, 0, 2)
    sd = opt.state_dict()
    assert all(isinstance(k, int) for k in sd["state"])
    for p in opt.param_groups[0]["params"]:
        assert set(opt.state[p]) == {"step", "hessian_ema", "hessian_refreshes", "momentum_buffer"}
        assert opt.state[p]["step"].item() == 2.0
    for group in sd["param_groups"]:
        assert (group["estimator"], group["engine"], group["hessian_every"], group["authors_code"], group["seed"]) == (
            "hutchinson",
            "autograd",
            3,
            False,
            7,
        )


def test_the_checkpoints_settings_win_with_a_warning():
    net, opt = fresh(dict(estimator="hutchinson", hessian_every=3))
    train(net, opt, 0, 1)
    other = SGDPH(sgdph_param_groups(net), estimator="rowsum", engine="finite_difference")
    with pytest.warns(
        UserWarning, match=r"estimator='hutchinson' \(was 'rowsum'\).*engine='autograd'.*hessian_every=3"
    ):
        other.load_state_dict(opt.state_dict())
    assert (other.estimator, other.engine, other.hessian_every) == ("hutchinson", "autograd", 3)
    train(net, other, 1, 2)  # and it continues with them
    assert other.state[other.param_groups[0]["params"][0]]["hessian_refreshes"] == 1  # steps 1 and 4 refresh


def test_a_group_cannot_set_an_optimizer_wide_setting():
    net = conv_bn_net()
    second, first = sgdph_param_groups(net)
    with pytest.raises(ValueError, match="estimator is optimizer-wide"):
        SGDPH([dict(second, estimator="hutchinson"), first])
    opt = SGDPH([second])
    opt.add_param_group(dict(first, lr=0.5))  # per-group hyperparameters stay per group
    assert opt.param_groups[1]["lr"] == 0.5 and opt.param_groups[1]["estimator"] == "rowsum"


def test_a_checkpoint_of_version_0_1_loads():
    """0.1 kept the step under a string key in state (which DCP cannot map) and no settings in groups."""
    net, opt = fresh({})
    train(net, opt, 0, 3)
    sd = opt.state_dict()
    old = {
        "state": {k: {n: v for n, v in s.items() if n != "step"} for k, s in sd["state"].items()},
        "param_groups": [
            {k: v for k, v in g.items() if k not in ("estimator", "engine", "hessian_every", "authors_code", "seed")}
            for g in sd["param_groups"]
        ],
    }
    old["state"]["sgdph"] = {"step": 3}
    net2, opt2 = fresh({})
    opt2.load_state_dict(old)
    assert "sgdph" not in opt2.state and opt2.estimator == "rowsum"
    assert [opt2.state[p]["step"].item() for p in opt2.param_groups[0]["params"]] == [3.0] * 4
