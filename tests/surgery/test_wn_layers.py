from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn

from sgdph_tools.surgery.wn_layers import WNConv2d, WNLinear, bake, to_weight_norm, unconvertible_reason
from sgdph_tools.tagging import BIAS, WEIGHT, WN_GAMMA, tag_parameters

LAYERS = [
    (nn.Conv1d(3, 5, 3, padding=1), (2, 3, 9)),
    (nn.Conv2d(4, 6, 3, stride=2, padding=1), (2, 4, 9, 9)),
    (nn.Conv2d(4, 8, 3, groups=4, padding=1, bias=False), (2, 4, 9, 9)),  # grouped, no bias
    (nn.Conv2d(4, 4, 5, groups=4, padding=2, padding_mode="reflect"), (2, 4, 9, 9)),  # depthwise
    (nn.Conv3d(2, 3, (1, 3, 3), dilation=(1, 2, 2)), (1, 2, 3, 9, 9)),
    (nn.Linear(7, 3), (4, 7)),
    (nn.Linear(7, 3, bias=False), (2, 5, 7)),
]


@pytest.mark.parametrize("layer,shape", LAYERS, ids=lambda v: type(v).__name__ if isinstance(v, nn.Module) else "")
def test_decoupled_and_baked_layers_keep_outputs(layer, shape):
    torch.manual_seed(0)
    x = torch.randn(shape)
    has_bias = layer.bias is not None
    for add_bias in (False, True):
        wn = to_weight_norm(layer, add_bias=add_bias)
        with_bias = has_bias or add_bias  # a bias-free layer stays bias-free unless asked
        assert [n for n, _ in wn.named_parameters()] == ["direction", "gamma"] + ["bias"] * with_bias
        assert wn.gamma.shape == (layer.weight.shape[0],)
        assert (wn.bias is not None and wn.bias.shape == (layer.weight.shape[0],)) or not with_bias
        torch.testing.assert_close(wn.gamma, layer.weight.flatten(1).norm(dim=1))
        torch.testing.assert_close(wn(x), layer(x), rtol=1e-6, atol=1e-6)
        plain = bake(wn)
        assert type(plain) is type(layer) and (plain.bias is not None) == with_bias
        torch.testing.assert_close(plain(x), layer(x), rtol=1e-6, atol=1e-6)


def test_the_output_scale_lives_in_gamma():
    layer = to_weight_norm(nn.Linear(4, 3))
    x = torch.randn(2, 4)
    before = layer(x) - layer.bias
    with torch.no_grad():
        layer.direction.mul_(5.0)  # the direction's norm does not matter...
        layer.gamma.mul_(2.0)  # ...gamma sets the per-channel scale
    torch.testing.assert_close(layer(x) - layer.bias, 2.0 * before)


def test_tags_gradients_and_pickling():
    model = nn.Sequential(
        WNConv2d(nn.Conv2d(2, 3, 3)),
        nn.Flatten(),
        WNLinear(nn.Linear(3 * 4 * 4, 2)),
        nn.ReLU(),
        WNLinear(nn.Linear(2, 2)),
    )
    tags = {n: t.kind for n, t in tag_parameters(model).items()}
    assert tags == {
        "0.direction": WEIGHT,
        "0.gamma": WN_GAMMA,
        "0.bias": BIAS,
        "2.direction": WEIGHT,
        "2.gamma": WN_GAMMA,
        "2.bias": BIAS,
        "4.direction": WEIGHT,
        "4.gamma": WN_GAMMA,
        "4.bias": BIAS,
    }
    groups = {n: t.group for n, t in tag_parameters(model).items()}
    assert groups["4.bias"] == "first_order" and groups["2.bias"] == "second_order"  # the classifier's bias
    model(torch.randn(2, 2, 6, 6)).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    blob = io.BytesIO()
    torch.save(model, blob)  # torch's parametrizations cannot do this
    blob.seek(0)
    assert isinstance(torch.load(blob, weights_only=False)[0], WNConv2d)


def test_code_that_reads_weight_keeps_working():
    mha = nn.MultiheadAttention(8, 2, batch_first=True)
    q = torch.randn(2, 5, 8)
    expected = mha(q, q, q)[0]
    mha.out_proj = to_weight_norm(mha.out_proj)  # MHA reads out_proj.weight, never calls it
    torch.testing.assert_close(mha(q, q, q)[0], expected)


def test_unconvertible_layers_get_a_reason():
    zero = nn.Conv2d(2, 3, 1)
    with torch.no_grad():
        zero.weight[1].zero_()
    assert "output channel(s) 1 have zero weight norm" in unconvertible_reason(zero)
    assert "transposed" in unconvertible_reason(nn.ConvTranspose2d(2, 2, 3))

    class CustomConv(nn.Conv2d):
        def forward(self, x):
            return super().forward(x) * 2

    assert "overrides the conv/linear forward" in unconvertible_reason(CustomConv(2, 2, 1))
    assert unconvertible_reason(nn.Conv2d(2, 2, 1)) is None
    with pytest.raises(ValueError, match="zero weight norm"):
        to_weight_norm(zero)
