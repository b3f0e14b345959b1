"""Product engines: how ``M v`` is computed, for M the Hessian or the Gauss-Newton matrix of the loss
restricted to chosen parameters. Every engine has one interface, :data:`Product`:
``engine(vectors, wanted)`` with ``vectors`` a dict {index into params: tensor} (zero elsewhere),
returning ``(M v)`` for ``params[j] for j in wanted``.

- :class:`AutogradHVP`: Hessian, double backward through gradients built with ``create_graph=True``.
- :class:`FiniteDifferenceHVP`: Hessian, ``(g(θ + r v) - g(θ)) / r`` on the 1-D gradients only: one
  more forward (a :class:`~.replay.ForwardReplay`) and a backward to the wanted tensors, no
  ``create_graph``.
- :class:`~.gauss_newton.GGNVectorProduct`: the exact Gauss-Newton (GGN) product, from the logits.

:func:`math_attention` and :func:`no_double_backward_error` serve the double-backward engines.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .replay import ForwardReplay
from .sharded import global_value, is_sharded

#: ``engine(vectors, wanted) -> [(M v) for params[j], j in wanted]``
Product = Callable[[dict[int, Tensor], Sequence[int]], list[Tensor]]
HVP = Product  # the name the estimators' signatures used before the Gauss-Newton engine joined them


class AutogradHVP:
    """HVPs by double backward through gradients that were built with ``create_graph=True``.

    ``grads[i]`` is the gradient of the loss w.r.t. ``params[i]`` (with its graph, or a tensor that
    does not require grad when that gradient is constant, i.e. its Hessian rows are zero).
    """

    def __init__(self, grads: Sequence[Tensor | None], params: Sequence[Tensor]):
        self.grads, self.params = list(grads), list(params)

    def __call__(self, vectors: dict[int, Tensor], wanted: Sequence[int]) -> list[Tensor]:
        """``(H v)`` restricted to ``params[j] for j in wanted``, where ``v`` is ``vectors[i]`` on
        ``params[i]`` and zero elsewhere."""
        pairs = [
            (self.grads[i], v) for i, v in vectors.items() if self.grads[i] is not None and self.grads[i].requires_grad
        ]
        inputs = [self.params[j] for j in wanted]
        if not pairs:  # every gradient involved is constant: these Hessian rows are zero
            return [torch.zeros_like(p) for p in inputs]
        outputs, grad_outputs = zip(*pairs)
        return list(torch.autograd.grad(outputs, inputs, grad_outputs, retain_graph=True, materialize_grads=True))


def finite_difference_step(params: Sequence[Tensor], vectors: Sequence[Tensor]) -> float:
    """The step r of a forward difference along ``v``: ``sqrt(eps) · max(1, rms(θ)) / rms(v)``.

    ``sqrt(eps)`` of the dtype balances truncation error (grows with r) against rounding error
    (grows as 1/r); scaling by the parameters' root-mean-square makes the perturbation relative for
    large parameters and absolute (about 3e-4 in float32) for small ones, such as betas at zero.
    """
    eps = torch.finfo(params[0].dtype).eps
    # one host read for both (on refreshing steps only): r stays a Python scalar so that
    # ``p.add_(v, alpha=r)`` is one fused multiply-add; a device r would need ``v * r`` first -- another
    # kernel and another rounding of every estimate
    rms_theta, rms_v = torch.stack([_rms(params), _rms(vectors)]).tolist()
    if rms_v == 0.0:
        raise ValueError("finite-difference HVP along a zero vector")
    return eps**0.5 * max(1.0, rms_theta) / rms_v


def _rms(tensors: Sequence[Tensor]) -> Tensor:
    """The root-mean-square of all entries of ``tensors`` (FSDP2 shards: over the whole tensors), a
    float32 0-d tensor."""
    if is_sharded(tensors):  # a global sum of squares per shard: DTensor reduces it across processes
        total = sum(global_value(t.detach().float().square().sum()) for t in tensors)
        return (total / sum(t.numel() for t in tensors)).sqrt()
    flat = torch.cat([t.detach().reshape(-1).float() for t in tensors])
    return flat.square().mean().sqrt()


class FiniteDifferenceHVP:
    """HVPs as ``(g(θ + r v) - g(θ)) / r``, restricted to the 1-D parameters.

    ``grads0[i]`` is the gradient of the replayed loss w.r.t. ``params[i]`` at the current point.
    Each call runs one more forward (through ``replay.again_grad()``) and a backward that asks only for
    the wanted gradients; the parameters are restored bit for bit afterwards. When the replay carries
    a ``cut`` for the one tensor moved, that forward reuses the activations below it
    (:mod:`sgdph_tools.activation_reuse`); when the RNG shows that a skipped module drew random
    numbers, the full forward runs again and its result is the one used.
    """

    def __init__(self, replay: ForwardReplay, params: Sequence[Tensor], grads0: Sequence[Tensor | None]):
        self.replay, self.params = replay, list(params)
        self.grads0 = [g if g is not None else torch.zeros_like(p) for g, p in zip(grads0, params)]

    def __call__(self, vectors: dict[int, Tensor], wanted: Sequence[int]) -> list[Tensor]:
        moved = [self.params[i] for i in vectors]
        r = finite_difference_step(moved, list(vectors.values()))
        saved = [p.detach().clone() for p in moved]
        inputs = [self.params[j] for j in wanted]
        cut = self.replay.cut
        if cut is not None and (len(moved) != 1 or moved[0] is not cut.target):
            cut = None  # the recorded activations are those below another tensor
        try:
            with torch.no_grad():
                for p, v in zip(moved, vectors.values()):
                    p.add_(v, alpha=r)
            grads1 = self.replay.again_grad(inputs, reuse=cut is not None)
            if cut is not None and not cut.rng_matched:  # a module handed back had drawn random numbers
                cut.give_up("a module below the perturbed layer draws random numbers: dropout, drop-path")
                grads1 = self.replay.again_grad(inputs, reuse=False)
            hv = [(g1.detach() - self.grads0[j]).div_(r) for g1, j in zip(grads1, wanted)]
        finally:
            with torch.no_grad():
                for p, s in zip(moved, saved):
                    p.copy_(s)
        return hv


def math_attention() -> contextlib.AbstractContextManager:
    """A context in which ``scaled_dot_product_attention`` takes its math path, which (unlike the
    fused kernels timm's transformers select) has a double backward."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.MATH])


def no_double_backward_error(error: RuntimeError) -> RuntimeError | None:
    """A one-line error naming the fix when ``error`` says an op has no double backward, else None."""
    text = str(error)
    if not ("derivative for" in text and "not implemented" in text):
        return None
    op = text.split("derivative for", 1)[1].split("is not implemented", 1)[0].strip()
    attention = "attention" in op
    fix = (
        "fused attention has no double backward: set TIMM_FUSED_ATTN=0 before importing timm, or run the "
        "forward under torch.nn.attention.sdpa_kernel(SDPBackend.MATH), or let the optimizer run it "
        "(optimizer.step(closure) or step(loss_fn=...) pick the math attention themselves)"
        if attention
        else "use engine='finite_difference', which needs no double backward"
    )
    return RuntimeError(f"SGD-PH's autograd engine needs a double backward, which {op} does not have; {fix}")
