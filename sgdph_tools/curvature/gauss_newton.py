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
- :class:`SubBatchGNB`: the same estimate from its own forward on the first fraction of the step's
  batch (Sophia estimates from a smaller batch too), taken from the model's recorded inputs: the
  step's backward then keeps no graph, and the extra work shrinks with the fraction.
- :func:`ggn_vector_product` / :class:`GGNVectorProduct`: the exact ``G v`` (the block-diagonal
  Hessian-free recipe): ``J v`` by the double-vjp trick (``Jᵀu`` is linear in a dummy ``u``; its vjp
  with ``v`` is ``J v``), the loss Hessian in closed form, then ``Jᵀ(·)`` by a vjp. It takes the
  logits *with their graph* rather than a function that recomputes them: that is exact, and cheaper
  (no extra forward; nothing to restore in BatchNorm or dropout), and the graph is kept for the
  caller. ``torch.func.jvp`` would need no dummy but rejects BatchNorm's in-place running-stat updates.
  :class:`GGNVectorProduct` has the HVP engines' interface, so the ``rowsum`` (``G_kk·1``) and
  ``hutchinson`` (``z ⊙ Gz``) estimators of :mod:`.estimators` run on ``G`` unchanged.

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

from .. import checks, distributed
from .recorded import RecordedForward
from .sharded import gradients_by_backward, is_sharded, sharded_rows

__all__ = [
    "gauss_newton_bartlett",
    "bartlett_gradients",
    "bartlett_curvature",
    "bartlett_rows",
    "bartlett_row_curvature",
    "ggn_vector_product",
    "GGNVectorProduct",
    "SubBatchGNB",
]


def _check_logits(logits: Tensor) -> None:
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        shape = tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a [batch, classes] tensor, got {shape}")
    if not logits.requires_grad:
        raise ValueError("logits must carry the graph to the parameters (computed with gradients enabled)")


def _check_params(params: Sequence[Tensor]) -> list[Tensor]:
    return checks.tensor_list("params", params, requires_grad=True)


def gauss_newton_bartlett(
    logits: Tensor, params: Sequence[Tensor], generator: torch.Generator | None = None
) -> list[Tensor]:
    """``B·ĝ⊙ĝ`` per parameter, ĝ the gradient of the mean cross-entropy of ``logits`` against labels
    sampled from ``softmax(logits)``: an unbiased estimate of the GGN diagonal. The graph of
    ``logits`` is kept for the caller. ``generator``'s device is where the labels are drawn.

    Non-finite logits (a diverged model) give NaN estimates, as every other estimator's would, rather
    than an exception from the label sampler: the optimizer keeps its previous estimate, and the
    caller's loss -- non-finite too -- tells it the run diverged."""
    return bartlett_curvature(*bartlett_gradients(logits, params, generator))


def bartlett_gradients(
    logits: Tensor, params: Sequence[Tensor], generator: torch.Generator | None = None
) -> tuple[list[Tensor], int]:
    """``(ĝ, B)``: the gradient of the mean cross-entropy of ``logits`` (``B`` rows) against labels
    sampled from their softmax, per parameter (NaN where the logits are not finite)."""
    params = _check_params(params)
    loss = sampled_label_loss(logits, generator)
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True, materialize_grads=True)
    return list(grads), logits.shape[0]


def sampled_label_loss(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """The mean cross-entropy of ``logits`` against labels sampled from their softmax; NaN (and so are
    its gradients) where the softmax is not finite: there is nothing to sample from."""
    _check_logits(logits)
    checks.generator("generator", generator)
    labels, finite = sampled_labels(logits, generator)
    loss = F.cross_entropy(logits, labels)
    return loss * finite.to(loss.dtype)  # x 1: the same loss and gradients to the bit


def sampled_labels(logits: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``(labels, finite)``: one label per row drawn from ``softmax(logits)`` (on ``generator``'s device),
    and a 0-d tensor that is 1 where the whole softmax is finite, NaN where not -- a factor, not a
    branch: no host-device synchronisation.

    The draw is ``torch.multinomial(probs, 1)``'s own algorithm for one sample, ``argmax(p / q)`` with
    ``q ~ Exp(1)`` from the same generator (ATen's ``Distributions.cpp``; the same labels and the same
    generator state, checked in tests/curvature/test_gauss_newton.py), without the validity checks
    around it: they cost five more launches and, on a GPU, a device-side assert that would abort the
    CUDA context on a NaN softmax where this gives a NaN estimate (the optimizer then keeps its previous
    one). A non-finite softmax is drawn from as uniform; its labels are never used, the estimate is NaN."""
    probs = torch.softmax(logits.detach().float(), dim=1)
    finite = torch.isfinite(probs).all()
    device = generator.device if generator is not None else probs.device
    probs = torch.where(finite, probs, 1.0).to(device)
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    labels = probs.div_(race).argmax(1).to(logits.device)
    return labels, torch.where(finite, 1.0, float("nan"))


#: chunks per batched backward in :func:`bartlett_rows` (time about the same, memory down by c / this)
CHUNKS_PER_BACKWARD = 8


def bartlett_rows(
    logits: Tensor, params: Sequence[Tensor], chunks: int | None, generator: torch.Generator | None = None
) -> tuple[list[Tensor], int]:
    """``(U, B)``: per parameter ``[c, *shape]``, row j the gradient ``uⱼ = Σ_{i∈j} Jᵢᵀ(pᵢ − e_ŷᵢ)`` of
    chunk j of the ``B`` rows (``c = min(chunks, B)`` contiguous chunks; None: one per row), labels ŷ sampled from the
    softmax. ``(1/B) Σⱼ uⱼuⱼᵀ`` is unbiased for the GGN block whatever the chunking (the cross terms of
    a chunk have mean zero) and of rank up to c -- one chunk is ``B·ĝĝᵀ``, rank one. Backwards batched
    over the chunks (``is_grads_batched``: vmap), ``CHUNKS_PER_BACKWARD`` at a time, not c backwards."""
    _check_logits(logits)
    params = _check_params(params)
    checks.generator("generator", generator)
    batch, classes = logits.shape
    c = chunk_count(batch, chunks)
    residual = sampled_residual(logits, generator)
    rows = torch.arange(batch, device=logits.device)
    outputs = torch.zeros(c, batch, classes, dtype=logits.dtype, device=logits.device)
    outputs[rows * c // batch, rows] = residual
    # batched backwards of at most CHUNKS_PER_BACKWARD chunks each: a batched backward holds one copy of
    # the activation gradients per chunk at once (the memory of block_newton's refresh, docs/benchmarks.md)
    pieces = [
        torch.autograd.grad(
            logits, params, part, retain_graph=True, is_grads_batched=True, allow_unused=True, materialize_grads=True
        )
        for part in outputs.split(CHUNKS_PER_BACKWARD)
    ]
    grads = pieces[0] if len(pieces) == 1 else [torch.cat(per_param) for per_param in zip(*pieces)]
    return list(grads), batch


def chunk_count(batch: int, chunks: int | None) -> int:
    """The number of chunks :func:`bartlett_rows` cuts ``batch`` rows into (None: one per row)."""
    return batch if chunks is None else max(1, min(chunks, batch))


def sampled_residual(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """``pᵢ − e_ŷᵢ`` per row, labels ŷ sampled from the softmax: the gradient of the cross-entropy
    against ŷ with respect to each row's logits (NaN everywhere where the softmax is not finite)."""
    labels, finite = sampled_labels(logits, generator)
    # in the logits' dtype, as the cross-entropy's own gradient (the float32 probs only sample)
    residual = torch.softmax(logits.detach(), dim=1) - F.one_hot(labels, logits.shape[1]).to(logits.dtype)
    return residual * finite.to(residual.dtype)


def bartlett_row_curvature(rows: Sequence[Tensor], batch: int, blocks: Sequence[bool]) -> list[Tensor]:
    """From :func:`bartlett_rows`' ``U``: ``(1/B)·UᵀU`` (``[n, n]``) where ``blocks[i]``, else its
    diagonal ``(1/B)·Σⱼ uⱼ⊙uⱼ``."""
    out = []
    for u, block in zip(rows, blocks):
        flat = u.reshape(u.shape[0], -1)
        out.append(flat.T @ flat / batch if block else (flat * flat).sum(0).div_(batch).view(u.shape[1:]))
    return out


def bartlett_curvature(grads: Sequence[Tensor], batch: int, blocks: Sequence[bool] | None = None) -> list[Tensor]:
    """Gauss-Newton-Bartlett estimates from sampled-label gradients ĝ of a ``batch``-row mean loss:
    ``B·ĝ⊙ĝ`` (unbiased for the GGN diagonal), or where ``blocks[i]`` is true the whole block
    ``B·ĝĝᵀ`` (``[n, n]`` for an ``n``-entry tensor; unbiased for the GGN block, of rank one)."""
    blocks = [False] * len(grads) if blocks is None else list(blocks)
    diagonal = [g for g, block in zip(grads, blocks) if not block]
    squares = torch._foreach_mul(diagonal, diagonal) if diagonal else []
    if squares:  # B·ĝ⊙ĝ in two multi-tensor kernels, not two per tensor
        torch._foreach_mul_(squares, batch)
    remaining = iter(squares)
    out = []
    for g, block in zip(grads, blocks):
        if block:
            flat = g.reshape(-1)
            out.append(torch.outer(flat, flat).mul_(batch))
        else:
            out.append(next(remaining))
    return out


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
        self._jt_u = torch.autograd.grad(
            logits, self.params, self._u, create_graph=True, retain_graph=True, allow_unused=True
        )

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
    vectors = checks.tensor_list("vectors", vectors)
    checks.same_shapes("vectors", vectors, "params", params)
    engine = GGNVectorProduct(logits, params)
    return engine(dict(enumerate(vectors)), range(len(params)))


class SubBatchGNB(RecordedForward):
    """Gauss-Newton-Bartlett from the model's own forward on a leading fraction of the batch.

    The model's latest train-mode inputs are recorded (:class:`~.recorded.RecordedForward`: a
    forward pre-hook, references, no copy); :meth:`estimate` runs the model again on their first
    ``b = max(2, round(fraction·B))`` rows with only ``params`` requiring gradients (the backward
    computes no weight gradient) and returns ``b·ĝ⊙ĝ``: unbiased for the GGN diagonal of those b
    examples. What the training run sees is untouched (buffers, RNG, autocast, DDP and compile
    wrappers: see :meth:`~.recorded.RecordedForward.rerun`).
    """

    purpose = "gnb_fraction"
    logits_hint = "; leave gnb_fraction unset and return (loss, logits) from loss_fn instead"

    def estimate(
        self, params: Sequence[Tensor], fraction: float, generator: torch.Generator | None = None
    ) -> list[Tensor]:
        """``b·ĝ⊙ĝ`` per parameter from the sub-batch's sampled-label gradients."""
        return bartlett_curvature(*self.sampled(params, fraction, generator))

    def sampled(
        self,
        params: Sequence[Tensor],
        fraction: float,
        generator: torch.Generator | None = None,
        chunks: int | None | bool = False,
    ) -> tuple[list[Tensor], int]:
        """``(ĝ, b)``: the sub-batch's sampled-label gradients and its size (:func:`bartlett_gradients`);
        with ``chunks`` (an int, or None: one per row), per-chunk gradients instead (:func:`bartlett_rows`)."""
        params = _check_params(params)
        sharded = is_sharded(params)
        with self.rerun(params, fraction) as (logits, rows):
            if chunks is not False and sharded:
                # FSDP2: a backward per chunk, whole rows gathered (curvature/sharded.py); every process
                # runs them, NaN rows where its logits are not finite
                residual = sampled_residual(logits, generator)
                every = self.module.parameters()
                u = sharded_rows(logits, residual, chunk_count(rows, chunks), params, every)
                return u, rows * distributed.world_size()
            if chunks is not False:
                return bartlett_rows(logits, params, chunks, generator)
            if not sharded:
                return bartlett_gradients(logits, params, generator)
            # FSDP2: the gradient by FSDP's backward, averaged over every process's sub-batch, so the
            # Bartlett square is scaled by the global sub-batch (curvature/sharded.py)
            loss = sampled_label_loss(logits, generator)  # NaN where not finite: every process runs the backward
            grads = gradients_by_backward(loss, params, self.module.parameters())
            return grads, rows * distributed.world_size()
