"""Partial-Hessian estimators for channel-wise 1-D parameters, from products ``M v`` (any engine of
:mod:`.products`):

- ``rowsum``: ``M_kk · 1`` for each tensor k -- the row sums of that tensor's own block, one product
  per tensor. This is what the paper's method computes. The paper calls it the exact diagonal, but
  the block is not diagonal (later layers mix channels), so it is the diagonal plus the off-diagonal
  row sums; ``docs/algorithm.md`` has the measured numbers.
- ``hutchinson``: ``z ⊙ (M z)`` with Rademacher ``z`` over all given tensors at once: one product, an
  unbiased estimate of the true diagonal.
- ``diagonal``: the exact diagonal of each block, one product per element: for tests and diagnostics.

The fourth estimator, Gauss-Newton-Bartlett (``gnb``), needs no product: :mod:`.gauss_newton`.
:func:`partial_hessian` is the estimate on its own, for a loss function.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from .. import checks
from .capabilities import HESSIAN_ENGINES, PRODUCT_ESTIMATORS, check_choice
from .products import AutogradHVP, FiniteDifferenceHVP, Product, math_attention
from .replay import ForwardReplay, LossFn
from .sharded import DTensor, local_like


def rademacher_like(t: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A ±1 tensor shaped like ``t``, drawn on the generator's device and moved to ``t``'s. For an
    FSDP2 shard (a DTensor) the whole tensor's probe is drawn and this process keeps its shard of it
    (no communication): with the generator seeded alike on every rank, the shards form one probe."""
    device = generator.device if generator is not None else t.device
    z = torch.randint(0, 2, t.shape, generator=generator, device=device, dtype=torch.int8)
    local = t.to_local() if isinstance(t, DTensor) else t
    return local_like(z.to(device=local.device, dtype=t.dtype).mul_(2).sub_(1), t)


def estimate(
    estimator: str,
    hvp: Product,
    params: Sequence[Tensor],
    indices: Sequence[int],
    generator: torch.Generator | None = None,
) -> list[Tensor]:
    """The ``estimator``'s estimate for ``params[k] for k in indices`` (same shapes), from ``hvp``."""
    check_choice("estimator", estimator, PRODUCT_ESTIMATORS)
    if not indices:
        return []
    if estimator == "rowsum":
        # Each tensor's own block only: v = 1 on tensor k, 0 elsewhere, and read back tensor k.
        return [hvp({k: torch.ones_like(params[k])}, [k])[0] for k in indices]
    if estimator == "hutchinson":
        z = {k: rademacher_like(params[k], generator) for k in indices}
        hz = hvp(z, list(indices))
        return [zk * hzk for zk, hzk in zip(z.values(), hz)]
    # diagonal: one HVP per element with a one-hot vector.
    out = []
    for k in indices:
        diag = torch.empty_like(params[k]).reshape(-1)
        for j in range(diag.numel()):
            e = torch.zeros_like(params[k]).reshape(-1)
            e[j] = 1.0
            diag[j] = hvp({k: e.view_as(params[k])}, [k])[0].reshape(-1)[j]
        out.append(diag.view_as(params[k]))
    return out


# ----------------------------------------------------------------------------- public function


def partial_hessian(
    loss_fn: LossFn,
    params: Iterable[Tensor],
    estimator: str = "rowsum",
    engine: str = "autograd",
    generator: torch.Generator | None = None,
    *,
    buffers: Iterable[Tensor] = (),
) -> list[Tensor]:
    """Estimate the partial Hessian of a loss w.r.t. channel-wise 1-D parameters.

    Args:
        loss_fn: recomputes the scalar loss: runs the forward pass and returns the loss, without
            calling backward. The finite-difference engine calls it more than once.
        params: the 1-D tensors (``requires_grad=True``).
        estimator: ``"rowsum"`` (``H_kk · 1`` per tensor, the paper's quantity), ``"hutchinson"``
            (``z ⊙ Hz``, unbiased for the true diagonal) or ``"diagonal"`` (exact, one HVP per element).
        engine: ``"autograd"`` (double backward) or ``"finite_difference"``.
        generator: random generator for Hutchinson's probe vectors.
        buffers: tensors to restore after the finite-difference engine's extra forwards, needed
            only for ``torch.compile``'d models (others are found automatically; see
            :func:`module_buffers_restored`).

    Returns:
        One tensor per parameter, same shape, detached (plain values, no graph).
    """
    checks.function("loss_fn", loss_fn, "runs the forward pass and returns the loss")
    check_choice("estimator", estimator, PRODUCT_ESTIMATORS)
    check_choice("engine", engine, HESSIAN_ENGINES)
    params = checks.tensor_list("params", params, requires_grad=True)
    checks.generator("generator", generator)
    buffers = checks.tensor_list("buffers", buffers)
    if not params:
        return []
    replay = ForwardReplay(loss_fn, {p.device for p in params}, buffers)
    create_graph = engine == "autograd"
    with torch.enable_grad():
        with math_attention() if create_graph else contextlib.nullcontext():  # fused attention: no double backward
            loss = replay.first()
        grads = torch.autograd.grad(loss, params, create_graph=create_graph, materialize_grads=True)
        if create_graph:
            hvp: Product = AutogradHVP(grads, params)
        else:
            hvp = FiniteDifferenceHVP(replay, params, [g.detach() for g in grads])
        result = estimate(estimator, hvp, params, range(len(params)), generator)
    return [h.detach() for h in result]
