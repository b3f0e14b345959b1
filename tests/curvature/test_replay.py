"""sgdph_tools/curvature/replay.py: what the extra forwards of a refresh put back."""

from __future__ import annotations

import torch
import torch.nn as nn

from sgdph_tools.curvature.replay import copies, module_buffers_restored
from tests.conftest import batch_for, conv_bn_net


def bits(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes as integers: equal only if every bit is (NaN and -0.0 included)."""
    same_size = {torch.float32: torch.int32, torch.float64: torch.int64}
    return t.contiguous().view(same_size.get(t.dtype, t.dtype))


def test_copies_are_bit_for_bit_detached_and_independent_across_dtypes():
    """Grouped by dtype (one multi-tensor copy each): float32, float64, int64, -0.0, NaN, a strided view."""
    sources = [
        torch.tensor([-0.0, float("nan"), 1.5, float("inf")]),
        torch.arange(6, dtype=torch.int64),
        torch.randn(3, 4, dtype=torch.float64).t(),
        torch.randn(5, requires_grad=True),
    ]
    out = copies(sources)
    for src, dst in zip(sources, out):
        assert dst.dtype == src.dtype and dst.shape == src.shape and not dst.requires_grad
        assert torch.equal(bits(dst), bits(src.detach())) and dst.data_ptr() != src.data_ptr()
    with torch.no_grad():
        sources[1].add_(1)
    assert torch.equal(out[1], torch.arange(6))


def test_buffers_come_back_from_a_list_or_from_the_modules_that_ran():
    """BatchNorm's running statistics and its int64 counter after forwards in train mode: restored
    from the explicit list (as compiled models need), and from the global hook (as eager ones use)."""
    torch.manual_seed(0)
    net = conv_bn_net()
    x, _ = batch_for(net)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    for explicit, find in ((list(net.buffers()), False), ((), True)):
        with module_buffers_restored(explicit, find_modules=find):
            net(x)
            net(x)
            assert not torch.equal(net[1].running_mean, before["1.running_mean"])
        for k, v in net.state_dict().items():
            assert torch.equal(v, before[k]), k
    assert isinstance(net[1], nn.BatchNorm2d)
