"""Curvature under FSDP2 (``torch.distributed.fsdp.fully_shard``): what works on sharded parameters,
and how a gradient is taken from them.

Under FSDP2 a parameter is a DTensor holding this process's shard; the forward all-gathers each
module's parameters into plain, unsharded tensors and the backward reduce-scatters their gradients
back into the shards' ``.grad`` -- averaged over processes. Two consequences for curvature:

- ``torch.autograd.grad(loss, params)`` with the sharded parameters finds them unused (the graph
  holds the gathered copies), so a gradient can only be taken by ``backward()`` through FSDP's hooks
  (:func:`gradients_by_backward`), which writes ``.grad``: the step's gradients are put aside and back.
- What comes back is already the average over every process's rows. An estimate built from it is
  global as it is (no all-reduce after), and the Gauss-Newton-Bartlett square ``B·ĝ⊙ĝ`` must be
  scaled by the global sub-batch ``B`` -- with a process's own rows it would shrink by the number of
  processes.

What works: Gauss-Newton-Bartlett from the optimizer's own forward on a sub-batch (``gnb_fraction``)
and the paper's row sums by finite differences (``rowsum``, ``engine="finite_difference"``: the
closure or loss function evaluated again at a perturbed point, FSDP averaging both gradients), with
the elementwise rules and ``normalized`` (its per-tensor mean is a DTensor reduction: one all-reduce
per tensor, on refreshing steps only). What cannot: a double backward (FSDP leaves no graph on the
sharded gradients: the autograd engine, GGN products), estimates that run a second backward through
the step's own graph (GNB from the step's logits; FSDP has freed the gathered parameters after that
backward), Hutchinson's probes (drawn per process; they would have to agree across shards) and the
block rules (each 1-D tensor solved whole, not supported yet). :func:`unsupported` names the mode that
works instead, so the optimizer refuses before its first step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from ..distributed import DTensor

#: what to use under FSDP2 instead of a mode that cannot work there
SHARDED_MODES = (
    "estimator='gnb' with gnb_fraction (the recipes' default mode), or estimator='rowsum' with "
    "engine='finite_difference'"
)


def is_sharded(tensors: Iterable[Tensor]) -> bool:
    """Whether any of ``tensors`` is a DTensor (an FSDP2 shard)."""
    return any(isinstance(t, DTensor) for t in tensors)


def unsupported(estimator: str, engine: str, gnb_fraction: float | None, rules: Sequence[str]) -> str | None:
    """The one-line reason a mode cannot run on FSDP2-sharded parameters, or None when it can."""
    block = sorted({r for r in rules if r.startswith("block")})
    if block:
        return (
            f"rule {block[0]!r} solves each 1-D tensor's block whole, which FSDP2 shards across processes "
            f"(not supported yet): under FSDP2 use rule='normalized', 'damped' or 'paper'"
        )
    if estimator == "gnb" and gnb_fraction is None:
        return (
            "estimator='gnb' without gnb_fraction runs a second backward through the step's own graph, whose "
            "gathered parameters FSDP2 frees after the first: under FSDP2 set gnb_fraction (e.g. 0.25), "
            "which runs its own forward"
        )
    if estimator == "rowsum" and engine == "finite_difference":
        return None  # a forward difference of FSDP's averaged gradients: the global batch's H·1
    if estimator != "gnb":
        if engine == "finite_difference":
            why = (
                "its probes would have to be drawn alike on every process"
                if estimator == "hutchinson"
                else ("one product per entry (a diagnostic)")
            )
            return f"estimator={estimator!r} is not supported under FSDP2 ({why}): use {SHARDED_MODES}"
        what = "GGN-vector products" if engine == "gauss_newton" else f"engine={engine!r}"
        return (
            f"estimator={estimator!r} with {what} needs a double backward, which FSDP2's sharded gradients do "
            f"not have: use {SHARDED_MODES}"
        )
    return None


def check_sharded(param_groups: list[dict], estimator: str, engine: str, gnb_fraction: float | None) -> None:
    """Raise ``ValueError`` naming the fix when the groups hold FSDP2 shards and the mode cannot run on them."""
    if is_sharded(p for g in param_groups for p in g["params"]):
        rules = [g.get("rule", "paper") for g in param_groups if g.get("second_order")]
        reason = unsupported(estimator, engine, gnb_fraction, rules)
        if reason is not None:
            raise ValueError(reason)


def gradients_by_backward(loss: Tensor, params: Sequence[Tensor], every_param: Iterable[Tensor]) -> list[Tensor]:
    """The gradient of ``loss`` for each of ``params`` (sharded), averaged over processes by FSDP's
    reduce-scatter, taken by ``loss.backward()``; the ``.grad`` of ``every_param`` (the model's
    parameters: FSDP writes them all) is what it was before. Every process must call it (collectives)."""
    every_param = list(every_param)
    saved = [p.grad for p in every_param]
    for p in every_param:
        p.grad = None
    try:
        loss.backward()
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    finally:
        for p, g in zip(every_param, saved):
            p.grad = g


def global_value(t: Tensor) -> Tensor:
    """A reduction of a DTensor (e.g. a sum over a shard) as the plain tensor of its global value."""
    return t.full_tensor() if isinstance(t, DTensor) else t
