"""Every "already normalised" decision is checked on the computation (surgery/probe.py): scaling the
layer's output channels must leave the train-mode function unchanged. The probe overrules the graph
both ways -- a norm that removes only a common or per-group scale does not make a layer normalised,
and a layer whose every path ends in BatchNorm (through a concat, a ReLU) is normalised."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from sgdph_tools.surgery.probe import TOLERANCE, ChannelScaleProbe
from sgdph_tools.surgery.rewrite import DECOUPLED, NORMALISED, convert


class Head(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, 3)

    def forward(self, x):
        return self.fc(self.pool(x).flatten(1))


class ConvInto(nn.Module):
    """conv -> ``norm`` -> ReLU -> head; the norm sees the conv's 8 channels."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.conv, self.norm, self.head = nn.Conv2d(3, 8, 3, padding=1), norm, Head(8)

    def forward(self, x):
        return self.head(torch.relu(self.norm(self.conv(x))))


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channels of an NCHW map (ConvNeXt's LayerNorm2d)."""

    def __init__(self, channels: int):
        super().__init__()
        self.ln = nn.LayerNorm(channels)

    def forward(self, x):
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class ConcatThenBN(nn.Module):
    """Two convs concatenated, then BatchNorm (DenseNet's pattern): both are normalised, though no
    norm is their direct consumer; and one through a ReLU first (ReLU commutes with positive scales)."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 3, padding=1), nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = Head(8)

    def forward(self, x):
        return self.head(torch.relu(self.bn(torch.cat([self.a(x), torch.relu(self.b(x))], dim=1))))


def decisions(model):
    torch.manual_seed(0)
    _, report = convert(model, example_input=torch.randn(2, 3, 8, 8))
    return {layer.name: layer for layer in report.layers}


@pytest.mark.parametrize(
    "norm,expected",
    [
        (nn.BatchNorm2d(8), NORMALISED),  # removes every channel's scale
        (nn.GroupNorm(8, 8), NORMALISED),  # one channel per group: per-channel
        (nn.InstanceNorm2d(8, affine=True), NORMALISED),
        (nn.GroupNorm(2, 8), DECOUPLED),  # only one scale per group of 4
        (ChannelLayerNorm(8), DECOUPLED),  # only a common scale
        (nn.LocalResponseNorm(2), DECOUPLED),  # neither
    ],
    ids=["batchnorm", "groupnorm-per-channel", "instancenorm", "groupnorm-2-groups", "layernorm-channels", "lrn"],
)
def test_what_normalised_means_is_decided_by_the_graph_and_checked_by_the_probe(norm, expected):
    conv = decisions(ConvInto(norm))["conv"]
    assert conv.action == expected, conv.detail
    if expected == NORMALISED:  # every "normalised" decision is checked on the computation
        assert "probe" in conv.evidence and "probe: scaling its output channels" in conv.detail
        assert conv.probe_change < TOLERANCE
    else:  # no norm here removes a channel's own scale: the graph says so, and the probe agrees
        assert conv.evidence == "graph" and "does not remove each channel's scale" in conv.detail
        torch.manual_seed(0)
        assert ChannelScaleProbe(ConvInto(norm), torch.randn(2, 3, 8, 8)).relative_change("conv") > TOLERANCE


def test_a_layer_behind_a_concat_and_batchnorm_is_normalised_no_redundant_gamma():
    found = decisions(ConcatThenBN())
    assert found["a"].action == NORMALISED and found["b"].action == NORMALISED
    assert "overruled by the probe" in found["a"].detail  # the graph saw a concat, not a norm
    assert found["head.fc"].action == DECOUPLED


def test_the_probe_measures_what_it_says():
    torch.manual_seed(0)
    probe = ChannelScaleProbe(ConvInto(nn.BatchNorm2d(8)), torch.randn(2, 3, 8, 8))
    assert probe.relative_change("conv") < TOLERANCE < probe.relative_change("head.fc")
    probe = ChannelScaleProbe(ConvInto(nn.GroupNorm(2, 8)), torch.randn(2, 3, 8, 8))
    assert probe.relative_change("conv") > 1e-3


def test_a_layer_the_probe_cannot_scale_keeps_the_graph_decision():
    class FunctionalUse(nn.Module):  # the weight is read by F.linear, the module is never called
        def __init__(self):
            super().__init__()
            self.proj, self.bn, self.out = nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)

        def forward(self, x):
            return self.out(self.bn(torch.relu(nn.functional.linear(x, self.proj.weight, self.proj.bias))))

    torch.manual_seed(0)
    _, report = convert(FunctionalUse(), example_input=torch.randn(2, 4))
    proj = next(layer for layer in report.layers if layer.name == "proj")
    assert "probe: nothing to scale" in proj.detail and "probe" not in proj.evidence


def test_layers_the_graph_calls_normalised_are_confirmed_together_and_a_real_scale_among_them_shows():
    torch.manual_seed(0)
    model, x = ConcatThenBN(), torch.randn(2, 3, 8, 8)
    probe = ChannelScaleProbe(model, x)
    change, scaled = probe.joint_change(["a", "b"])  # both feed the BatchNorm (through a concat)
    assert change < TOLERANCE and scaled == ["a", "b"]
    change, scaled = probe.joint_change(["a", "b", "head.fc"])  # the head's scale is real
    assert change > 1e-3 and scaled == ["a", "b", "head.fc"]
    # convert: BatchNorm'd convs confirmed in one forward, each with the measurement
    two_bn = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2),
    )  # fmt: skip
    found = decisions(two_bn)
    for conv in ("0", "3"):
        assert found[conv].action == NORMALISED and found[conv].probe_change < TOLERANCE
        assert "with those of the 1 other layers the graph calls normalised" in found[conv].detail
    assert found["8"].action == DECOUPLED and found["8"].probe_change > 1e-3  # the head: on its own
