"""sgdph_tools/train/loop.py: what an epoch reads back from the device."""

from __future__ import annotations

import torch

from sgdph_tools import SGDPH, sgdph_param_groups
from sgdph_tools.train.loop import DivergenceGuard, StepSettings, train_one_epoch
from tests.conftest import conv_bn_net, host_reads


def test_an_epoch_reads_the_device_only_at_its_checks_and_the_optimizers_refreshes():
    """The recipes' default mode (GNB on a quarter, refreshing every 4 steps here), 8 iterations, a check
    every 4: the running loss and accuracy stay on the device between checks (on a GPU each read is a
    synchronisation that drains the launch queue). Reads: each check's running sums and window (2),
    each refresh's finiteness check (iterations 1 and 5), the epoch's totals (1)."""
    torch.manual_seed(0)
    net = conv_bn_net()
    # batches in a list: a DataLoader draws its epoch's seed with an .item() of a CPU tensor (no device read)
    loader = [(torch.randn(8, 2, 6, 6), torch.randint(0, 3, (8,))) for _ in range(8)]
    opt = SGDPH(sgdph_param_groups(net), lr=0.05, estimator="gnb", gnb_fraction=0.25, hessian_every=4, model=net)
    scheduler = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1.0 / (1 + i))
    settings = StepSettings(torch.device("cpu"), "fp32", None, None, False)
    epoch = lambda: train_one_epoch(  # noqa: E731
        net, opt, scheduler, loader, settings, epoch=0, log_every=4, guard=DivergenceGuard(10.0, 3, num_classes=3)
    )
    epoch()  # the first step creates the optimizer's state
    assert host_reads(epoch) == 2 * 2 + 2 + 1
