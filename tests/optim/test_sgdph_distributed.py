"""Two real processes (gloo on CPU) with DDP: in every usage that DDP allows, the replicas end
identical, Hessian state included; torch.distributed.checkpoint saves and restores the optimizer."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

from sgdph_tools import SGDPH, sgdph_param_groups
from tests.conftest import batch_for, conv_bn_net, join_gloo

WORLD = 2
STEPS = 4
# usage, options, whether the optimizer is given the DDP module
FORMS = {
    "loss_fn-rowsum-autograd": ("loss_fn", dict(estimator="rowsum", engine="autograd"), False),
    "loss_fn-hutchinson-fd": ("loss_fn", dict(estimator="hutchinson", engine="finite_difference"), False),
    "closure-rowsum-fd": ("closure", dict(engine="finite_difference"), False),
    "closure-hutchinson-fd-model": ("closure", dict(estimator="hutchinson", engine="finite_difference"), True),
    "closure-rowsum-autograd-model": ("closure", dict(engine="autograd"), True),
    # block_newton: the GNB block estimate is averaged across processes (else the replicas drift);
    # the exact mode's CG runs on averaged products
    "loss_fn-block-gnb": ("loss_fn", dict(rule="block_newton", estimator="gnb", hessian_every=2), False),
    "closure-block-exact-model": ("closure", dict(rule="block_newton", engine="gauss_newton", cg_steps=4), True),
}


def build(rank: int, options: dict, give_model: bool):
    torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
    net = conv_bn_net(dropout=0.1)
    ddp = torch.nn.parallel.DistributedDataParallel(net)
    return net, ddp, SGDPH(sgdph_param_groups(net), lr=0.05, model=ddp if give_model else None, **options)


def train(rank, net, ddp, opt, usage, start, steps):
    losses = []
    for step in range(start, start + steps):
        x, y = batch_for(net, seed=100 * rank + step)  # each rank its own shard

        def closure():
            opt.zero_grad()
            logits = ddp(x)
            loss = F.cross_entropy(logits, y)
            loss.backward(create_graph=opt.is_second_order)
            return loss, logits

        def loss_fn():
            logits = ddp(x)
            return F.cross_entropy(logits, y), logits

        loss = opt.step(closure) if usage == "closure" else opt.step(loss_fn=loss_fn)
        losses.append(loss.item())
    return losses


def worker(rank: int, port: int, out_dir: str) -> None:
    join_gloo(rank, port, WORLD)
    try:
        results = {}
        for form, (usage, options, give_model) in FORMS.items():
            net, ddp, opt = build(rank, options, give_model)
            losses = train(rank, net, ddp, opt, usage, 0, STEPS)
            results[form] = {
                "params": [p.detach() for p in net.parameters()],
                "state": opt.state_dict()["state"],
                "losses": losses,
            }
        # The autograd engine through DDP's reducer (no model given): a clear error, not DDP's.
        net, ddp, opt = build(rank, {}, False)
        try:
            train(rank, net, ddp, opt, "closure", 0, 1)
        except RuntimeError as error:
            results["reducer_error"] = str(error)
        # torch.distributed.checkpoint: save after 2 steps, restore into fresh optimizers, continue.
        options = dict(estimator="hutchinson", engine="finite_difference")
        net, ddp, opt = build(rank, options, False)
        torch.manual_seed(7)
        train(rank, net, ddp, opt, "loss_fn", 0, 2)
        dcp.save(
            {"model": net.state_dict(), "optim": get_optimizer_state_dict(ddp, opt)},
            checkpoint_id=os.path.join(out_dir, "dcp"),
        )
        rng = torch.get_rng_state()
        train(rank, net, ddp, opt, "loss_fn", 2, 2)
        net2, ddp2, opt2 = build(rank + 10, options, False)
        template = {"model": net2.state_dict(), "optim": get_optimizer_state_dict(ddp2, opt2)}
        dcp.load(template, checkpoint_id=os.path.join(out_dir, "dcp"))
        net2.load_state_dict(template["model"])
        set_optimizer_state_dict(ddp2, opt2, template["optim"])
        torch.set_rng_state(rng)
        train(rank, net2, ddp2, opt2, "loss_fn", 2, 2)
        results["dcp_equal"] = all(
            torch.equal(a, b) for a, b in zip(net.state_dict().values(), net2.state_dict().values())
        )
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_replicas_stay_identical_in_every_usage_and_dcp_round_trips(tmp_path, free_port):
    mp.spawn(worker, args=(free_port, str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD))
    for form in FORMS:
        a, b = r0[form], r1[form]
        assert a["losses"] != b["losses"], form  # the shards differ, so local gradients and Hessians differ
        for p0, p1 in zip(a["params"], b["params"]):
            assert torch.equal(p0, p1), form
        refreshed = 0
        for key, s0 in a["state"].items():
            for name, value in s0.items():
                assert torch.equal(torch.as_tensor(value), torch.as_tensor(b["state"][key][name])), (form, key, name)
            if "hessian_block" in s0:
                assert s0["step"] == STEPS
                refreshed += s0["hessian_refreshes"]
                assert s0["hessian_refreshes"] == STEPS // 2 and s0["hessian_block"].abs().sum() > 0
            elif "hessian_ema" in s0:
                assert s0["step"] == STEPS
                refreshed += s0["hessian_refreshes"]
                assert s0["hessian_refreshes"] == 0 or s0["hessian_ema"].abs().sum() > 0
        if "exact" not in form:  # the exact mode keeps no estimate: its CG runs on each step's products
            assert refreshed >= STEPS, form
    assert "pass model=<the DDP module>" in r0["reducer_error"] and "\n" not in r0["reducer_error"]
    assert r0["dcp_equal"] and r1["dcp_equal"]
