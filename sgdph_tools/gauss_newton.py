"""Gauss-Newton curvature for softmax cross-entropy, restricted to chosen parameters.

For a mean softmax cross-entropy over a batch of B examples with logits ``f(θ)`` (shape ``[B, C]``)
the generalised Gauss-Newton (GGN) matrix is ``G = (1/B) Σᵢ Jᵢᵀ (diag pᵢ − pᵢpᵢᵀ) Jᵢ``, ``Jᵢ`` the
Jacobian of example i's logits and ``pᵢ`` its softmax. For this loss it equals the Fisher; it is
positive semi-definite and contains no second derivative of the network, so ReLU kinks do not enter.
In train mode BatchNorm couples the examples: ``Jᵢ`` is then the Jacobian of row i of the whole
batch's logits, and everything below still holds.

- :func:`gauss_newton_bartlett` (Sophia's GNB estimator, Liu et al. 2023): labels ŷ drawn from the
  model's own softmax, ĝ the gradient of the mean loss on ŷ; ``B·ĝ⊙ĝ`` is an unbiased estimate of
  ``diag(G)``: one extra backward, no second forward, no double backward.
- :func:`ggn_vector_product` / :class:`GGNVectorProduct`: the exact ``G v`` (the block-diagonal
  Hessian-free recipe): ``J v`` by the double-vjp trick (``Jᵀu`` is linear in a dummy ``u``; its vjp
  with ``v`` is ``J v``), the loss Hessian in closed form, then ``Jᵀ(·)`` by a vjp. It takes the
  logits *with their graph* rather than a function that recomputes them: that is exact, and cheaper
  (no extra forward; nothing to restore in BatchNorm or dropout), and the graph is kept for the
  caller. ``torch.func.jvp`` would need no dummy but rejects BatchNorm's in-place running-stat updates.
  :class:`GGNVectorProduct` has the HVP engines' interface, so the ``rowsum`` (``G_kk·1``) and
  ``hutchinson`` (``z ⊙ Gz``) estimators of :mod:`sgdph_tools.hessian` run on ``G`` unchanged.

Supported: integer class labels, mean reduction, no label smoothing, no class weights. The GGN of a
label-smoothed or class-weighted loss is the same matrix up to per-example weights; these estimates
do not take such weights, and the estimators have no labels to check: the optimizer's recipes
reject ``label_smoothing`` with them where the project sets it (nothing does yet).
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["gauss_newton_bartlett", "ggn_vector_product", "GGNVectorProduct"]


def _check_logits(logits: Tensor) -> None:
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a [batch, classes] tensor, got {shape}")
    if not logits.requires_grad:
        raise ValueError("logits must carry the graph to the parameters (computed with gradients enabled)")


def _check_params(params: Sequence[Tensor]) -> list[Tensor]:
    if isinstance(params, Tensor):
        raise TypeError("params must be a list of tensors, not one tensor: pass [tensor]")
    params = list(params)
    if not all(isinstance(p, Tensor) and p.requires_grad for p in params):
        raise ValueError("every parameter must be a tensor with requires_grad=True")
    return params


def gauss_newton_bartlett(logits: Tensor, params: Sequence[Tensor], generator: torch.Generator | None = None) -> list[Tensor]:
    """``B·ĝ⊙ĝ`` per parameter, ĝ the gradient of the mean cross-entropy of ``logits`` against labels
    sampled from ``softmax(logits)``: an unbiased estimate of the GGN diagonal. The graph of
    ``logits`` is kept for the caller. ``generator``'s device is where the labels are drawn."""
    _check_logits(logits)
    params = _check_params(params)
    probs = torch.softmax(logits.detach().float(), dim=1)
    device = generator.device if generator is not None else probs.device
    labels = torch.multinomial(probs.to(device), 1, generator=generator).squeeze(1).to(logits.device)
    loss = F.cross_entropy(logits, labels)
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    batch = logits.shape[0]
    return [torch.zeros_like(p) if g is None else g.detach().square().mul_(batch) for g, p in zip(grads, params)]


class GGNVectorProduct:
    """Exact GGN-vector products ``G v`` restricted to ``params``, with the HVP engines' interface:
    ``engine(vectors, wanted)`` with ``vectors`` a dict {index into params: tensor} (zero elsewhere),
    returning ``(G v)`` for ``params[j] for j in wanted``. The logits' graph is kept."""

    def __init__(self, logits: Tensor, params: Sequence[Tensor]):
        _check_logits(logits)
        self.logits, self.params = logits, _check_params(params)
        self.probs = torch.softmax(logits.detach(), dim=1)
        # Jᵀu for a dummy u, kept as a function of u: its vjp with v is J v.
        self._u = torch.zeros_like(logits, requires_grad=True)
        self._jt_u = torch.autograd.grad(logits, self.params, self._u, create_graph=True, retain_graph=True,
                                         allow_unused=True)

    def __call__(self, vectors: dict[int, Tensor], wanted: Sequence[int]) -> list[Tensor]:
        pairs = [(self._jt_u[i], v) for i, v in vectors.items() if self._jt_u[i] is not None]
        inputs = [self.params[j] for j in wanted]
        if not pairs:  # the logits do not depend on these parameters
            return [torch.zeros_like(p) for p in inputs]
        outputs, grad_outputs = zip(*pairs)
        (jv,) = torch.autograd.grad(outputs, self._u, grad_outputs, retain_graph=True)
        p = self.probs
        h_jv = (p * jv - p * (p * jv).sum(dim=1, keepdim=True)) / self.logits.shape[0]  # loss Hessian · Jv
        out = torch.autograd.grad(self.logits, inputs, h_jv, retain_graph=True, allow_unused=True)
        return [torch.zeros_like(x) if g is None else g.detach() for g, x in zip(out, inputs)]


def ggn_vector_product(logits: Tensor, params: Sequence[Tensor], vectors: Sequence[Tensor]) -> list[Tensor]:
    """``G v`` restricted to ``params``: one vector per parameter, same shapes; exact, no second
    derivative of the network. ``logits`` (``[B, C]``) carries the graph to ``params``, kept."""
    params = _check_params(params)
    if isinstance(vectors, Tensor) or len(vectors) != len(params):
        raise ValueError("vectors must be a list with one tensor per parameter")
    for p, v in zip(params, vectors):
        if v.shape != p.shape:
            raise ValueError(f"a vector of shape {tuple(v.shape)} for a parameter of shape {tuple(p.shape)}")
    engine = GGNVectorProduct(logits, params)
    return engine(dict(enumerate(vectors)), range(len(params)))
