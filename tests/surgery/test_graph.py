"""The feeds-a-norm decision on small modules that reproduce the patterns of real models."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from sgdph_tools.surgery.graph import GRAPH, LEAF_GRAPH, LEAF_OUTPUT, MODULE_ORDER, WEIGHT_USE, analyse


def decided(model):
    return {name: (d.feeds_norm, d.evidence) for name, d in analyse(model).decisions.items()}


class Patterns(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv_bn, self.bn = nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4)
        self.conv_perm_ln, self.ln = nn.Conv2d(4, 4, 1), nn.LayerNorm(4)  # convnext: through a permute
        self.lin_levit, self.bn1d = nn.Linear(4, 4), nn.BatchNorm1d(4)  # levit: bn(x.flatten(0, 1)).reshape_as(x)
        self.conv_act, self.bn_after_act = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.conv_fn = nn.Conv2d(4, 4, 1)  # F.group_norm over 2 groups: one scale per group goes, not each channel's
        self.conv_fn_in = nn.Conv2d(4, 4, 1)  # F.instance_norm: each channel's scale goes
        self.conv_two_users, self.bn2 = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.conv_drop, self.drop, self.bn3 = nn.Conv2d(4, 4, 1), nn.Dropout(0.1), nn.BatchNorm2d(4)
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        x = self.bn(self.conv_bn(x))
        x = self.ln(self.conv_perm_ln(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        t = x.flatten(2).transpose(1, 2)  # B, N, C
        y = self.lin_levit(t)
        t = self.bn1d(y.flatten(0, 1)).reshape_as(y)
        x = t.transpose(1, 2).reshape(x.shape)
        x = self.bn_after_act(torch.relu(self.conv_act(x)))
        x = F.group_norm(self.conv_fn(x), 2)
        x = F.instance_norm(self.conv_fn_in(x))
        y = self.conv_two_users(x)
        x = self.bn2(y) + y
        x = self.bn3(self.drop(self.conv_drop(x)))
        return self.head(x.mean((2, 3)))


def test_patterns_of_real_models():
    assert decided(Patterns()) == {
        "conv_bn": (True, GRAPH),
        "conv_perm_ln": (False, GRAPH),  # LayerNorm over channels removes only a common scale
        "lin_levit": (True, GRAPH),
        "conv_act": (False, GRAPH),
        "conv_fn": (False, GRAPH),
        "conv_fn_in": (True, GRAPH),
        "conv_two_users": (False, GRAPH),
        "conv_drop": (True, GRAPH),
        "head": (False, GRAPH),
    }
    details = {n: d.detail for n, d in analyse(Patterns()).decisions.items()}
    assert (
        "permute" in details["conv_perm_ln"]
        and "LayerNorm 'ln' (does not remove each channel's scale)" in details["conv_perm_ln"]
    )
    assert details["head"] == "feeds the model output"


class Untraceable(nn.Module):
    """Control flow on a tensor value: torch.fx cannot trace it."""

    def __init__(self):
        super().__init__()
        self.inner, self.inner_bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
        self.last = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        if x.sum() > 0:
            x = x * 2
        return self.last(self.inner_bn(self.inner(x)))


class WithLeaf(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 1)
        self.block = Untraceable()
        self.norm = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.norm(self.block(self.stem(x)))


def test_layers_inside_an_untraceable_leaf_are_decided_and_marked():
    analysis = analyse(WithLeaf())
    assert decided(WithLeaf()) == {
        "stem": (False, GRAPH),
        "block.inner": (True, MODULE_ORDER),  # next in module order: block.inner_bn
        "block.last": (True, LEAF_OUTPUT),  # the leaf's last layer; the leaf feeds `norm`
    }
    assert analysis.traced and "block" in analysis.notes[0] and "did not trace" in analysis.notes[0]


def test_a_model_that_does_not_trace_falls_back_to_module_order():
    analysis = analyse(Untraceable())
    assert not analysis.traced and "TraceError" in analysis.trace_error
    assert decided(Untraceable()) == {"inner": (True, MODULE_ORDER), "last": (False, MODULE_ORDER)}


class ReadsWeight(nn.Module):
    def __init__(self, norm: nn.Module):
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = norm
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.norm(F.linear(x, self.proj.weight, self.proj.bias)))


def test_a_layer_used_through_its_weight_is_decided_from_that_use():
    analysis = analyse(ReadsWeight(nn.BatchNorm1d(4)))
    assert decided(ReadsWeight(nn.BatchNorm1d(4)))["proj"] == (True, WEIGHT_USE)
    assert "read by linear" in analysis.decisions["proj"].detail
    # swin_v2's attention reads its weights so, then a LayerNorm: that keeps each channel's scale
    assert decided(ReadsWeight(nn.LayerNorm(4)))["proj"] == (False, WEIGHT_USE)


class Shared(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3)

    def forward(self, x):
        return self.conv(self.bn(self.conv(x)))  # second call feeds the output


def test_a_shared_layer_feeds_a_norm_only_if_every_call_does():
    assert decided(Shared()) == {"conv": (False, GRAPH)}


def test_leaf_modules_are_traced_on_their_own():
    import timm

    analysis = analyse(timm.create_model("nf_resnet26", num_classes=4))
    evidence = {d.evidence for d in analysis.decisions.values()}
    assert LEAF_GRAPH in evidence  # NormFreeBlock is one of timm's leaf modules
    assert len(analysis.decisions) == 30
