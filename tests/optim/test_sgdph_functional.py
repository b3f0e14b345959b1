"""The functional core ``sgdph()`` in torch's style: the foreach and for-loop implementations agree,
on mixed dtypes (grouped by device and dtype), new and old momentum buffers, fresh and stale
curvature, tensors with and without curvature yet, both ε placements and every rule; each rule
against its formula written out independently in float64."""

from __future__ import annotations

import pytest
import torch

from sgdph_tools.optim.functional import sgdph


def case(seed: int):
    g = torch.Generator().manual_seed(seed)
    dtypes = [torch.float32, torch.float64, torch.float32, torch.float64, torch.float32, torch.bfloat16]
    shapes = [(5,), (3,), (7,), (4,), (2,), (6,)]
    params = [torch.randn(s, generator=g).to(d) for s, d in zip(shapes, dtypes)]
    grads = [torch.randn(s, generator=g).to(d) for s, d in zip(shapes, dtypes)]
    bufs = [None if i % 3 == 0 else torch.randn(s, generator=g).to(d) for i, (s, d) in enumerate(zip(shapes, dtypes))]
    emas = [torch.rand(s, generator=g).to(d) for s, d in zip(shapes, dtypes)]
    hessians = [None if i % 2 else torch.randn(s, generator=g).to(d) for i, (s, d) in enumerate(zip(shapes, dtypes))]
    corrections = [None, 0.1, 0.19, None, 0.5, 0.271]
    return params, grads, bufs, emas, hessians, corrections


@pytest.mark.parametrize(
    "eps_in_correction,rule", [(False, "paper"), (True, "paper"), (False, "damped"), (False, "normalized")]
)
@pytest.mark.parametrize("momentum,weight_decay", [(0.9, 5e-3), (0.0, 0.0)])
def test_foreach_and_for_loop_agree_on_mixed_dtypes(eps_in_correction, rule, momentum, weight_decay):
    results = []
    for foreach in (False, True):
        params, grads, bufs, emas, hessians, corrections = case(0)
        sgdph(
            params,
            grads,
            bufs,
            emas,
            hessians,
            corrections,
            foreach=foreach,
            lr=0.1,
            momentum=momentum,
            weight_decay=weight_decay,
            so_lr=2e-3,
            hessian_momentum=0.8,
            eps=1e-3,
            eps_in_correction=eps_in_correction,
            rule=rule,
        )
        results.append((params, bufs, emas))
    (p0, b0, e0), (p1, b1, e1) = results
    for i in range(len(p0)):
        # bfloat16's CPU foreach kernels may round differently from the per-tensor ones (as in torch's tests)
        tol = dict(rtol=1e-2, atol=1e-2) if p0[i].dtype == torch.bfloat16 else dict(rtol=0, atol=0)
        assert p0[i].dtype == p1[i].dtype
        torch.testing.assert_close(p0[i], p1[i], **tol)
        torch.testing.assert_close(e0[i], e1[i], **tol)
        assert (b0[i] is None) == (b1[i] is None) and (b0[i] is not None or not momentum)  # created when needed
        if b0[i] is not None:
            torch.testing.assert_close(b0[i], b1[i], **tol)


def _ratio(rule: str, D: torch.Tensor, c: float, so_lr: float, eps: float) -> torch.Tensor:
    """The step relative to SGD's, as the docstring writes it."""
    d_hat = D / c
    if rule == "paper":
        return so_lr / (d_hat + eps)
    if rule == "damped":
        return 1 / (1 + d_hat / eps)
    mean = d_hat.mean()
    relative = torch.ones_like(d_hat) if mean == 0 else d_hat / mean
    return (1 + eps) / (relative + eps)


@pytest.mark.parametrize("rule", ["paper", "damped", "normalized"])
def test_the_documented_rule_per_tensor(rule):
    params, grads, bufs, emas, hessians, corrections = case(1)
    emas[1].zero_()  # no fresh estimate: a tensor whose curvature is all zero so far (normalized: r = 1, not 0/0)
    start = [p.double().clone() for p in params]
    bufs0 = [None if b is None else b.double().clone() for b in bufs]
    emas0 = [e.double().clone() for e in emas]
    sgdph(
        params,
        grads,
        bufs,
        emas,
        hessians,
        corrections,
        foreach=False,
        lr=0.1,
        momentum=0.9,
        weight_decay=0.01,
        so_lr=2e-3,
        hessian_momentum=0.8,
        eps=0.5,
        rule=rule,
    )
    for i in range(len(params)):
        g = grads[i].double()
        buf = g if bufs0[i] is None else 0.9 * bufs0[i] + g
        D = emas0[i] if hessians[i] is None else 0.8 * emas0[i] + 0.2 * hessians[i].double().abs()
        c = corrections[i]
        step = buf if c is None else _ratio(rule, D, c, 2e-3, 0.5) * buf
        expected = start[i] - 0.1 * (step + 0.01 * start[i])
        tol = 1e-2 if params[i].dtype == torch.bfloat16 else 1e-6
        torch.testing.assert_close(params[i].double(), expected, rtol=tol, atol=tol)


def test_lists_of_different_lengths_are_rejected():
    params, grads, bufs, emas, hessians, corrections = case(2)
    with pytest.raises(ValueError, match="one entry per parameter"):
        sgdph(
            params,
            grads,
            bufs,
            emas,
            hessians,
            corrections[:-1],
            lr=0.1,
            momentum=0.9,
            weight_decay=0.0,
            so_lr=1e-3,
            hessian_momentum=0.9,
            eps=1e-4,
        )


def test_unknown_rule_and_authors_code_with_another_rule_are_rejected():
    params, grads, bufs, emas, hessians, corrections = case(3)
    kw = dict(lr=0.1, momentum=0.9, weight_decay=0.0, so_lr=1e-3, hessian_momentum=0.9, eps=1e-4)
    with pytest.raises(ValueError, match="rule"):
        sgdph(params, grads, bufs, emas, hessians, corrections, rule="sophia", **kw)
    with pytest.raises(ValueError, match="rule='paper'"):
        sgdph(params, grads, bufs, emas, hessians, corrections, rule="damped", eps_in_correction=True, **kw)
