"""SGDPH.compile_update (optim/compiled.py) on CPU with inductor: the compiled update against the eager
one on the same steps, and what runs compiled."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from sgdph_tools import SGDPH, sgdph_param_groups
from tests.conftest import conv_bn_net

STEPS, EVERY = 12, 3


class Calls:
    """Counts the calls of a compiled function, passing them on."""

    def __init__(self, fn):
        self.fn, self.count = fn, 0

    def __call__(self, *args, **kwargs):
        self.count += 1
        return self.fn(*args, **kwargs)


def test_the_compiled_update_follows_the_eager_one_without_recompiling_as_the_lr_changes():
    """The recipes' default mode (GNB on a quarter, normalized), refreshing every 3 steps, weight decay,
    the learning rate changed before every step (a scheduler): the same parameters to rounding; the flat
    update runs compiled on every step (refreshing ones too: the fresh estimates are folded into the flat
    state first; the state exists from the start), torch's SGD part on every step, and there
    are three graphs in all -- the flat update, the first-order SGD and GNB's sub-batch forward, compiled
    once for every refresh (a learning rate is a tensor input, not a constant; the sub-batch's shape and
    gradient switches are fixed). The BatchNorm statistics the sub-batch forward touched are put back."""
    torch.manual_seed(0)
    eager_net = conv_bn_net()
    compiled_net = copy.deepcopy(eager_net)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 2, 6, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    options = dict(lr=0.1, weight_decay=5e-4, estimator="gnb", gnb_fraction=0.25, hessian_every=EVERY)
    eager = SGDPH(sgdph_param_groups(eager_net), model=eager_net, **options)
    compiled = SGDPH(sgdph_param_groups(compiled_net), model=compiled_net, **options)
    torch._dynamo.reset()
    counters.clear()
    compiled.compile_update()
    flat = compiled._compiled.flat_update = Calls(compiled._compiled.flat_update)
    sgd = compiled._compiled.momentum_sgd = Calls(compiled._compiled.momentum_sgd)
    addresses = set()
    for step in range(STEPS):
        held = next((f for f in compiled._flat.values() if f is not None), None)
        if held is not None:  # built after the first refresh
            addresses.add(held.denominator.data_ptr())
        for net, opt in ((eager_net, eager), (compiled_net, compiled)):
            for group in opt.param_groups:
                group["lr"] = 0.1 * (1 - step / STEPS)
            opt.step(loss_fn=lambda net=net: (F.cross_entropy(logits := net(x), y), logits))
    for a, b in zip(eager_net.parameters(), compiled_net.parameters()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    assert flat.count == STEPS and sgd.count == STEPS
    assert counters["stats"]["unique_graphs"] == 3
    for a, b in zip(eager_net.buffers(), compiled_net.buffers()):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-6)
    # what a CUDA graph keeps reading stays where it was: the cached divisor, rebuilt at each refresh, in
    # place; the parameters, the optimizer state and the divisor are marked at static addresses
    assert len(addresses) == 1
    held = next(f for f in compiled._flat.values() if f is not None)
    kept = [*compiled_net.parameters(), held.buf, held.denominator]
    first_order = [p for g in compiled.param_groups if not g["second_order"] for p in g["params"]]
    kept += [compiled.state[p]["momentum_buffer"] for p in first_order]  # (the others: views of held.buf)
    assert all(getattr(t, "_dynamo_static_input_type", None) for t in kept)
    for state_a, state_b in zip(eager.state.values(), compiled.state.values()):
        torch.testing.assert_close(state_b["momentum_buffer"], state_a["momentum_buffer"], rtol=1e-5, atol=1e-6)


def test_an_unknown_compile_mode_is_refused_with_the_choices():
    opt = SGDPH(sgdph_param_groups(conv_bn_net()))
    with pytest.raises(ValueError, match="reduce-overhead"):
        opt.compile_update("fast")


def test_finite_differences_on_a_compiled_model_stop_recompiling_once_the_update_is_compiled():
    """Activation reuse cuts the forward at a layer with hooks; on a compiled model they made it recompile
    at every refresh (84x SGDM's step on small_cnn). compile_update turns the reuse off: after a warm-up
    of two round-robin cycles, a third compiles nothing new."""
    torch.manual_seed(0)
    net = conv_bn_net()
    compiled_net = torch.compile(net)
    opt = SGDPH(sgdph_param_groups(net), lr=0.1, estimator="rowsum", engine="finite_difference", model=net)
    assert opt.reuse_activations
    opt.compile_update()
    assert not opt.reuse_activations
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(16, 2, 6, 6, generator=g), torch.randint(0, 3, (16,), generator=g)
    cycle = sum(len(group["params"]) for group in opt.param_groups if group["second_order"])
    torch._dynamo.reset()
    counters.clear()

    def steps(n):
        for _ in range(n):
            opt.step(loss_fn=lambda: F.cross_entropy(compiled_net(x), y))

    steps(2 * cycle)
    warm = counters["stats"]["unique_graphs"]
    steps(cycle)
    assert counters["stats"]["unique_graphs"] == warm
