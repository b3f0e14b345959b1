"""The small nets: stages and stem stride set the channels and how much of the image each output
position sees (the receptive field the docstring states, measured by the input gradient)."""

from __future__ import annotations

import pytest
import timm
import torch

import sgdph_tools.models  # noqa: F401  (registers small_cnn)


@pytest.mark.parametrize(
    "kwargs,size,channels,field", [({}, 32, 128, 9), ({"stages": 4, "stem_stride": 2}, 64, 256, 31)]
)
def test_stages_and_stem_stride_set_width_and_receptive_field(kwargs, size, channels, field):
    torch.manual_seed(0)
    model = timm.create_model("small_cnn", num_classes=10, in_chans=3, **kwargs).eval()
    x = torch.randn(4, 3, size, size, requires_grad=True)
    features = model.features(x)
    assert features.shape[1] == channels
    centre = features.shape[-1] // 2
    features[..., centre, centre].sum().backward()
    seen = x.grad.abs().sum((0, 1)) > 0
    rows, cols = seen.any(1).nonzero().flatten(), seen.any(0).nonzero().flatten()
    assert (rows.max() - rows.min() + 1, cols.max() - cols.min() + 1) == (field, field)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_invalid_stages_is_a_clear_error():
    with pytest.raises(ValueError, match="stages >= 1"):
        timm.create_model("small_cnn_nobn", stages=0)
