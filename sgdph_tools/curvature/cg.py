"""Conjugate gradient for a damped curvature block, ``(M + λI) x = b``, from products ``M v`` alone.

The solver of the block rules (``SGDPH(rule="block_newton", engine="gauss_newton")``): ``M`` is
positive semi-definite (a Gauss-Newton block), so with ``λ > 0`` CG converges, in exact arithmetic
within ``n`` iterations for an ``n``-entry block. Two guards keep it honest in floating point: it stops
when the residual is small relative to ``b`` (:func:`default_tolerance`: a few ulps of the dtype), and
it never divides by a curvature ``pᵀ(M + λI)p`` that is not positive and finite (a product that lost
all precision): it returns the iterate it has.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, field

import torch
from torch import Tensor


def default_tolerance(dtype: torch.dtype) -> float:
    """The relative residual at which CG stops: ten ulps of the dtype (float32 1.2e-6, float64 2.2e-15)."""
    return 10.0 * torch.finfo(dtype).eps


@dataclass
class CGResult:
    solution: Tensor
    iterations: int
    #: the residual's norm relative to ``b``'s at the end
    relative_residual: float
    #: the residual ``b − (M + λI)x`` itself (the quadratic's value at x is ``−½ xᵀ(b + r)``)
    residual: Tensor | None = None
    #: with ``keep_at``: copies of the iterate after those iteration counts, and after the last one
    iterates: dict[int, Tensor] = field(default_factory=dict)


def conjugate_gradient(
    product: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    damping: float,
    max_iters: int,
    tol: float | None = None,
    x0: Tensor | None = None,
    keep_at: Collection[int] = (),
) -> CGResult:
    """Solve ``(M + damping·I) x = b`` for ``x`` (``b``'s shape), ``product(v) = M v``.

    Stops after ``max_iters`` products, or when ``|r| ≤ tol·|b|`` (``tol`` default:
    :func:`default_tolerance`), or when a search direction has no positive finite curvature. ``x0``
    starts CG from a previous solution (warm start; its residual costs one more product). ``keep_at``:
    iteration counts after which a copy of the iterate is kept (Martens' backtracking over CG
    iterates). Each iteration reads two scalars on the host
    (the stopping tests): this is a reference solver, not a hot path."""
    if max_iters < 1:
        raise ValueError(f"max_iters must be >= 1, got {max_iters}")
    if not damping >= 0.0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    tol = default_tolerance(b.dtype) if tol is None else tol

    def damped(v: Tensor) -> Tensor:
        return product(v).add_(v, alpha=damping) if damping else product(v)

    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - damped(x) if x0 is not None else b.clone()
    b_norm = float(b.norm())
    if b_norm == 0.0:
        zero = torch.zeros_like(b)
        return CGResult(zero, 0, 0.0, torch.zeros_like(b), {0: zero.clone()} if keep_at else {})
    rr = float(torch.dot(r.reshape(-1), r.reshape(-1)))
    direction = r.clone()
    iterations = 0
    kept: dict[int, Tensor] = {}
    while iterations < max_iters and rr**0.5 > tol * b_norm:
        m_direction = damped(direction)
        curvature = float(torch.dot(direction.reshape(-1), m_direction.reshape(-1)))
        if not (curvature > 0.0 and curvature < float("inf")):
            break  # no positive curvature along this direction: keep the iterate, never divide by it
        step = rr / curvature
        x.add_(direction, alpha=step)
        r.sub_(m_direction, alpha=step)
        rr_next = float(torch.dot(r.reshape(-1), r.reshape(-1)))
        direction.mul_(rr_next / rr).add_(r)
        rr = rr_next
        iterations += 1
        if iterations in keep_at:
            kept[iterations] = x.clone()
    if keep_at and iterations not in kept:
        kept[iterations] = x.clone()  # the last iterate, when it stopped between the kept counts
    return CGResult(x, iterations, rr**0.5 / b_norm, r, kept)
