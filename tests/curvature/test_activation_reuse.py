"""Finite differences that reuse the activations below the perturbed tensor: the same numbers as the
full forward, with the layers below not run, and switched off where reuse would be wrong."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import sgdph_tools  # noqa: F401  (registers the models)
from sgdph_tools import SGDPH
from sgdph_tools.curvature import FiniteDifferenceHVP, ForwardReplay
from sgdph_tools.curvature.activation_reuse import ActivationReuse
from sgdph_tools.optim import sgdph_param_groups


class CountedConv(nn.Conv2d):
    calls = 0

    def forward(self, x):
        CountedConv.calls += 1
        return super().forward(x)


class Block(nn.Module):
    """conv-BN-ReLU(inplace) twice with an in-place residual addition, as torchvision's BasicBlock:
    BN's output is modified in place by ``+=`` and by the ReLU, so some records are stale."""

    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = CountedConv(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = CountedConv(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU(inplace=True)  # one module called twice per block

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += x
        return self.relu(out)


def residual_net(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        CountedConv(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(dropout),
        Block(8),
        Block(8),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 5),
    ).train()


def one_d(model):
    return [p for p in model.parameters() if p.ndim == 1]


def fd_rowsum(model, x, y, target, reuse: ActivationReuse | None):
    """``H·1`` of ``target``'s block by a forward difference, the activations below it reused or not."""
    replay = ForwardReplay(lambda: F.cross_entropy(model(x), y), buffers=list(model.buffers()))
    replay.cut = reuse.for_target(target) if reuse is not None else None
    (g0,) = torch.autograd.grad(replay.first(), [target])
    before = CountedConv.calls
    (hv,) = FiniteDifferenceHVP(replay, [target], [g0])({0: torch.ones_like(target)}, [0])
    return hv, CountedConv.calls - before, replay.cut


def test_reuse_gives_the_full_forwards_numbers_and_skips_the_convolutions_below():
    model = residual_net()
    x, y = torch.randn(6, 3, 12, 12), torch.randint(0, 5, (6,))
    reuse = ActivationReuse(model)
    convs_run = []
    for target in one_d(model):
        full, _, _ = fd_rowsum(model, x, y, target, None)
        for _ in range(2):  # the first refresh walks the graph below the tensor, the second knows it
            hv, convs, cut = fd_rowsum(model, x, y, target, reuse)
            assert torch.equal(hv, full)  # bit for bit
        convs_run.append(convs)
    assert reuse.enabled and not any(reuse.reads_target.values())
    # 5 convolutions; the perturbed forward runs only those at or above the target's layer. In order:
    # stem conv bias, stem BN (2), block 1's bn1 (2) and bn2 (2), block 2's the same, classifier bias
    assert convs_run == [5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0, 0]


def test_sgdph_trajectory_is_the_same_with_and_without_reuse():
    model = timm.create_model("small_cnn", num_classes=5, in_chans=3)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 5, (8,))
    finals = []
    for reuse in (True, False):
        m = copy.deepcopy(model)
        opt = SGDPH(sgdph_param_groups(m), lr=0.1, engine="finite_difference", model=m)
        opt.reuse_activations = reuse
        for _ in range(2 * len(opt.param_groups[0]["params"])):  # two rounds of the round robin
            opt.step(loss_fn=lambda: F.cross_entropy(m(x), y))
        finals.append(torch.cat([p.detach().flatten() for p in m.parameters()]))
        if reuse:
            assert opt.curvature._activation_reuse.enabled and len(opt.curvature._activation_reuse.reads_target) == len(
                opt.param_groups[0]["params"]
            )
    assert torch.equal(finals[0], finals[1])


def test_dropout_below_the_layer_switches_reuse_off():
    model = residual_net(dropout=0.3)
    x, y = torch.randn(6, 3, 12, 12), torch.randint(0, 5, (6,))
    reuse = ActivationReuse(model)
    target = one_d(model)[-3]  # a BatchNorm above the dropout
    torch.manual_seed(1)
    full, _, _ = fd_rowsum(model, x, y, target, None)
    torch.manual_seed(1)
    with pytest.warns(RuntimeWarning, match="random numbers"):
        hv, _, _ = fd_rowsum(model, x, y, target, reuse)
    assert torch.equal(hv, full) and not reuse.enabled


class Shift(nn.Module):
    """A leaf module that reads another module's bias (held in a list, so not a child of it)."""

    def __init__(self, source: nn.Linear):
        super().__init__()
        self.source = [source]

    def forward(self, x):
        return x + self.source[0].bias.sum()


class ReadsAnotherModulesBias(nn.Module):
    """``late.bias`` is read by ``shift``, called before ``late``: hooks cannot see that."""

    def __init__(self):
        super().__init__()
        self.early, self.late = nn.Linear(4, 4), nn.Linear(4, 3)
        self.shift = Shift(self.late)

    def forward(self, x):
        return self.late(self.shift(self.early(x)))


def test_a_module_that_reads_the_tensor_outside_its_owner_is_run_again():
    model = ReadsAnotherModulesBias()
    x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
    reuse = ActivationReuse(model)
    full, _, _ = fd_rowsum(model, x, y, model.late.bias, None)
    hv, _, cut = fd_rowsum(model, x, y, model.late.bias, reuse)
    assert torch.equal(hv, full) and reuse.enabled
    shift_call = [i for i, c in enumerate(cut._calls) if c.module == id(model.shift)]
    assert reuse.reads_target[id(model.late.bias)] == set(shift_call)  # found in shift's graph: it runs again
    assert cut.handed_back == 1  # early's output is reused
