"""Two real processes (gloo on CPU) with DDP: replicas must end identical, Hessian state included."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from sgdph_tools import SGDPH, sgdph_param_groups
from tests.conftest import batch_for, conv_bn_net

WORLD = 2
STEPS = 4


def worker(rank: int, port: int, out_dir: str, options: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(rank)  # different initial weights: DDP must broadcast rank 0's
        net = conv_bn_net(dropout=0.1)
        ddp = torch.nn.parallel.DistributedDataParallel(net)
        opt = SGDPH(sgdph_param_groups(net), lr=0.05, **options)
        losses = []
        for step in range(STEPS):
            x, y = batch_for(net, seed=100 * rank + step)  # each rank its own shard
            losses.append(opt.step(loss_fn=lambda: F.cross_entropy(ddp(x), y)).item())
        torch.save(
            {"params": [p.detach() for p in net.parameters()], "state": opt.state_dict()["state"], "losses": losses},
            os.path.join(out_dir, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize(
    "options",
    [dict(estimator="rowsum", engine="autograd"), dict(estimator="hutchinson", engine="finite_difference")],
    ids=["rowsum-autograd", "hutchinson-fd"],
)
def test_replicas_stay_identical(tmp_path, free_port, options):
    mp.spawn(worker, args=(free_port, str(tmp_path), options), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD))
    assert r0["losses"] != r1["losses"]  # the shards differ, so local gradients and Hessians differ
    for p0, p1 in zip(r0["params"], r1["params"]):
        assert torch.equal(p0, p1)
    refreshed = 0
    for key, s0 in r0["state"].items():
        s1 = r1["state"][key]
        if key == "sgdph":
            assert s0["step"] == s1["step"] == STEPS
            continue
        for name, value in s0.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(s1[name])), (key, name)
        if "hessian_ema" in s0:
            refreshed += s0["hessian_refreshes"]
            assert s0["hessian_refreshes"] == 0 or s0["hessian_ema"].abs().sum() > 0
    assert refreshed >= STEPS
