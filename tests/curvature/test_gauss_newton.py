"""Gauss-Newton curvature against the GGN built by brute force in float64: the exact products, the
estimators run on them, and Sophia's Gauss-Newton-Bartlett estimate converging to the exact diagonal."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from sgdph_tools.curvature import GGNVectorProduct, estimate, gauss_newton_bartlett, ggn_vector_product
from sgdph_tools.curvature.gauss_newton import (
    bartlett_row_curvature,
    bartlett_rows,
    sampled_label_loss,
    sampled_labels,
    sampled_residual,
)
from tests.conftest import batch_for, conv_bn_net, ln_mlp


def one_d(net):
    return [p for p in net.parameters() if p.ndim == 1]


def brute_force_ggn(net, x, params):
    """G = (1/B) Σᵢ Jᵢᵀ (diag pᵢ − pᵢpᵢᵀ) Jᵢ from the full Jacobian of the batch's logits (BatchNorm in
    train mode couples the rows, so each row's Jacobian is taken through the whole batch)."""
    logits = net(x)
    B, C = logits.shape
    rows = []
    for i in range(B):
        for c in range(C):
            g = torch.autograd.grad(logits[i, c], params, retain_graph=True, allow_unused=True)
            rows.append(
                torch.cat([torch.zeros_like(p).reshape(-1) if t is None else t.reshape(-1) for t, p in zip(g, params)])
            )
    J = torch.stack(rows).reshape(B, C, -1)
    p = torch.softmax(logits.detach(), dim=1)
    G = sum(J[i].T @ (torch.diag(p[i]) - torch.outer(p[i], p[i])) @ J[i] for i in range(B)) / B
    return G, logits


NETS = {"conv-bn-relu": lambda: conv_bn_net(), "ln-gelu-mlp": lambda: ln_mlp()}


@pytest.mark.parametrize("net_name", sorted(NETS))
def test_ggn_vector_products_are_exact(net_name):
    torch.manual_seed(0)
    net = NETS[net_name]().double()
    x, _ = batch_for(net, dtype=torch.float64)
    params = one_d(net)
    G, logits = brute_force_ggn(net, x, params)
    assert torch.linalg.eigvalsh(G).min() > -1e-12  # positive semi-definite
    v = [torch.randn_like(p) for p in params]
    Gv = torch.cat([t.reshape(-1) for t in ggn_vector_product(logits, params, v)])
    torch.testing.assert_close(Gv, G @ torch.cat([t.reshape(-1) for t in v]), rtol=1e-10, atol=1e-12)
    # The graph is kept: a second product on the same logits works.
    ggn_vector_product(logits, params, v)


def test_estimators_run_on_the_ggn():
    torch.manual_seed(0)
    net = conv_bn_net().double()
    x, _ = batch_for(net, dtype=torch.float64)
    params = one_d(net)
    G, logits = brute_force_ggn(net, x, params)
    engine = GGNVectorProduct(logits, params)
    sizes = [p.numel() for p in params]
    starts = [sum(sizes[:k]) for k in range(len(sizes))]
    rowsum = estimate("rowsum", engine, params, range(len(params)))
    for k, (s, n) in enumerate(zip(starts, sizes)):  # G_kk · 1: the row sums of each tensor's own block
        torch.testing.assert_close(rowsum[k], G[s : s + n, s : s + n].sum(1), rtol=1e-10, atol=1e-12)
    diagonal = estimate("diagonal", engine, params, range(len(params)))
    torch.testing.assert_close(torch.cat(diagonal), torch.diagonal(G), rtol=1e-10, atol=1e-12)
    g = torch.Generator().manual_seed(0)
    hutch = torch.stack([torch.cat(estimate("hutchinson", engine, params, range(len(params)), g)) for _ in range(400)])
    assert torch.nn.functional.cosine_similarity(hutch.mean(0), torch.diagonal(G), dim=0) > 0.95


def test_gauss_newton_bartlett_is_unbiased_for_the_ggn_diagonal():
    """The mean of N draws stays within 4.5 standard errors of diag(G), elementwise, and N draws
    are much closer than a few."""
    torch.manual_seed(0)
    net = conv_bn_net().double()
    x, _ = batch_for(net, n=6, dtype=torch.float64)
    params = one_d(net)
    G, logits = brute_force_ggn(net, x, params)
    target = torch.diagonal(G)
    g = torch.Generator().manual_seed(1)
    draws = torch.stack([torch.cat(gauss_newton_bartlett(logits, params, g)) for _ in range(3000)])
    assert (draws >= 0).all()
    mean, se = draws.mean(0), draws.std(0) / draws.shape[0] ** 0.5
    assert ((mean - target).abs() <= 4.5 * se + 1e-12).all()
    few = draws[:5].mean(0)
    assert (mean - target).norm() < 0.5 * (few - target).norm()


def test_bad_arguments_are_named():
    net = conv_bn_net()
    x, _ = batch_for(net)
    logits = net(x)
    with pytest.raises(TypeError, match=r"not one tensor: pass \[params\]"):
        gauss_newton_bartlett(logits, net[1].weight)
    with pytest.raises(ValueError, match=r"\[batch, classes\]"):
        gauss_newton_bartlett(logits[0], one_d(net))
    with pytest.raises(ValueError, match="carry the graph"):
        gauss_newton_bartlett(logits.detach(), one_d(net))
    with pytest.raises(ValueError, match=r"one tensor per entry of params \(5\), got 1"):
        ggn_vector_product(logits, one_d(net), [torch.ones(4)])


def test_parameters_the_logits_do_not_depend_on_get_zeros():
    net = conv_bn_net()
    x, _ = batch_for(net)
    stray = nn.Parameter(torch.ones(3))
    params = one_d(net)[:1] + [stray]
    logits = net(x)
    assert torch.equal(gauss_newton_bartlett(logits, params)[1], torch.zeros(3))
    assert torch.equal(ggn_vector_product(logits, [stray], [torch.ones(3)])[0], torch.zeros(3))


@pytest.mark.parametrize("chunks", [None, 5, 1])
def test_bartlett_rows_are_per_chunk_sampled_label_gradients_and_unbiased_for_the_block(chunks):
    """Row j of ``U`` is the gradient of chunk j's summed loss at the sampled labels (checked against
    one backward per chunk, 12 rows: two batched backwards of at most 8 chunks when one per row), and
    the mean of (1/B)·UᵀU over draws is the GGN block (within 4.5 standard errors, every entry)."""
    torch.manual_seed(0)
    net = conv_bn_net().double()
    x, _ = batch_for(net, n=12, dtype=torch.float64)
    params = [p for p in net.parameters() if p.ndim == 1][:2]
    G, logits = brute_force_ggn(net, x, params)
    gen = torch.Generator().manual_seed(5)
    same = torch.Generator().manual_seed(5)  # the labels bartlett_rows draws
    labels = torch.multinomial(torch.softmax(logits.detach().float(), 1), 1, generator=same).squeeze(1)
    rows, batch = bartlett_rows(logits, params, chunks, gen)
    c = 12 if chunks is None else chunks
    assert batch == 12 and rows[0].shape == (c, *params[0].shape)
    for j in range(c):
        members = [i for i in range(12) if i * c // 12 == j]  # contiguous chunks
        loss = F.cross_entropy(logits[members], labels[members], reduction="sum")
        for u, g in zip(rows, torch.autograd.grad(loss, params, retain_graph=True)):
            torch.testing.assert_close(u[j], g, rtol=1e-10, atol=1e-12)
    if chunks == 5:
        return  # the chunking is checked; unbiasedness below for one per row and one chunk
    draws = [bartlett_row_curvature(*bartlett_rows(logits, params, chunks, gen), [True, True]) for _ in range(2000)]
    start = 0
    for k, p in enumerate(params):
        n = p.numel()
        target = G[start : start + n, start : start + n]
        start += n
        stack = torch.stack([d[k] for d in draws])
        mean, se = stack.mean(0), stack.std(0) / len(draws) ** 0.5
        assert ((mean - target).abs() <= 4.5 * se + 1e-12).all(), (k, chunks)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sampled_labels_are_torch_multinomials_draw_to_the_bit(dtype):
    """The sync-free draw gives ``torch.multinomial(softmax, 1)``'s labels and leaves the generator in
    the same state (its one-sample algorithm, without the checks around it): estimates are unchanged
    from when the sampler was torch.multinomial. A masked class (-inf logit) is never drawn."""
    for seed in range(40):
        logits = torch.randn(7 + seed, 3 + seed % 11, generator=torch.Generator().manual_seed(seed), dtype=dtype)
        logits[:, 0] = float("-inf") if seed % 3 == 0 else logits[:, 0]
        ours, torchs = torch.Generator().manual_seed(100 + seed), torch.Generator().manual_seed(100 + seed)
        labels, finite = sampled_labels(logits, ours)
        expected = torch.multinomial(torch.softmax(logits.float(), 1), 1, generator=torchs).squeeze(1)
        assert torch.equal(labels, expected) and finite.item() == 1.0
        assert torch.equal(ours.get_state(), torchs.get_state())
        assert seed % 3 or not (labels == 0).any()


def test_non_finite_logits_give_nan_estimates_with_no_data_dependent_branch():
    """One non-finite row makes every estimate NaN (the optimizer then keeps its previous one), as a
    factor rather than a host-side check: dynamo traces the sampled-label gradient and the per-chunk
    residual whole, which a ``bool()`` or ``.item()`` of a device tensor would break."""
    torch.manual_seed(0)
    net = conv_bn_net()
    x, _ = batch_for(net)
    params = one_d(net)
    logits = net(x)
    bad = logits.clone()
    bad[1, 2] = float("nan")
    assert all(torch.isnan(h).all() for h in gauss_newton_bartlett(bad, params))
    assert all(torch.isnan(u).all() for u in bartlett_rows(bad, params, 2)[0])
    assert all(torch.isfinite(h).all() for h in gauss_newton_bartlett(logits, params))
    torch._dynamo.reset()
    for traced in (sampled_residual, sampled_label_loss):
        explained = torch._dynamo.explain(traced)(logits.detach().requires_grad_())
        assert explained.graph_break_count == 0 and explained.graph_count == 1, explained.break_reasons
