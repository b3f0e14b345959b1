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

What works: Gauss-Newton-Bartlett from the optimizer's own forward on a sub-batch (``gnb_fraction``),
the paper's row sums and Hutchinson's ``z ⊙ Hz`` by finite differences (``engine="finite_difference"``:
the closure or loss function evaluated again at a perturbed point, FSDP averaging both gradients;
Hutchinson's probe is one vector of the global tensor, drawn alike on every rank, each keeping its
shard), the elementwise rules and ``normalized`` (its per-tensor mean is a DTensor reduction: one
all-reduce per tensor, on refreshing steps only), and the block rules' cheap mode (each chunk's
sampled-label gradient by one backward through FSDP, :func:`sharded_rows`; the small 1-D tensors'
rows and momentum gathered whole, each block solved alike on every rank, which keeps its shard of the
direction). What cannot: a double backward (FSDP leaves no graph on the sharded gradients: the
autograd engine, GGN products, block_newton's exact CG), estimates that run a second backward through
the step's own graph (GNB from the step's logits; FSDP has freed the gathered parameters after that
backward) and the exact diagonal (one product per entry, a diagnostic). :func:`unsupported` names the
mode that works instead, so the optimizer refuses before its first step.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import Tensor

from .. import distributed
from ..distributed import DTensor

#: what to use under FSDP2 instead of a mode that cannot work there
SHARDED_MODES = (
    "estimator='gnb' with gnb_fraction (the recipes' default mode), or estimator='rowsum' or 'hutchinson' "
    "with engine='finite_difference'"
)


def is_sharded(tensors: Iterable[Tensor]) -> bool:
    """Whether any of ``tensors`` is a DTensor (an FSDP2 shard)."""
    return any(isinstance(t, DTensor) for t in tensors)


def unsupported(estimator: str, engine: str, gnb_fraction: float | None, rules: Sequence[str]) -> str | None:
    """The one-line reason a mode cannot run on FSDP2-sharded parameters, or None when it can."""
    block = sorted({r for r in rules if r.startswith("block")})
    if block and engine == "gauss_newton":
        return (
            f"rule {block[0]!r} with engine='gauss_newton' solves by CG on GGN-vector products, which need a "
            "double backward that FSDP2's sharded gradients do not have: under FSDP2 use its cheap mode, "
            "estimator='gnb' with gnb_fraction"
        )
    if estimator == "gnb" and gnb_fraction is None:
        return (
            "estimator='gnb' without gnb_fraction runs a second backward through the step's own graph, whose "
            "gathered parameters FSDP2 frees after the first: under FSDP2 set gnb_fraction (e.g. 0.25), "
            "which runs its own forward"
        )
    if estimator in ("rowsum", "hutchinson") and engine == "finite_difference":
        return None  # a forward difference of FSDP's averaged gradients: the global batch's H·v
    if estimator != "gnb":
        if engine == "finite_difference":
            return (
                f"estimator={estimator!r} is not supported under FSDP2 (one product per entry: a diagnostic): "
                f"use {SHARDED_MODES}"
            )
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


def gradients_by_backward(
    loss: Tensor, params: Sequence[Tensor], every_param: Iterable[Tensor], retain_graph: bool = False
) -> list[Tensor]:
    """The gradient of ``loss`` for each of ``params`` (sharded), averaged over processes by FSDP's
    reduce-scatter, taken by ``loss.backward()``; the ``.grad`` of ``every_param`` (the model's
    parameters: FSDP writes them all) is what it was before. Every process must call it (collectives)."""
    every_param = list(every_param)
    saved = [p.grad for p in every_param]
    for p in every_param:
        p.grad = None
    try:
        loss.backward(retain_graph=retain_graph)
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    finally:
        for p, g in zip(every_param, saved):
            p.grad = g


def global_value(t: Tensor) -> Tensor:
    """A reduction of a DTensor (e.g. a sum over a shard) as the plain tensor of its global value."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def local_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` (the whole tensor, alike on every process) as a shard placed like ``like``: this process's
    slice, no communication; ``full`` itself when ``like`` is not sharded."""
    if not isinstance(like, DTensor):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full, like.device_mesh, like.placements, src_data_rank=None)


def gathered_rows(rows: Sequence[Tensor], like: Tensor) -> Tensor:
    """``[c, *shape]``: the whole tensors of ``c`` shards placed like ``like``, in one all-gather (the
    shards stacked, sharded one dimension further in)."""
    if not isinstance(like, DTensor):
        return torch.stack(list(rows))
    from torch.distributed.tensor import Shard

    local = torch.stack([r.to_local() for r in rows])
    placements = [Shard(pl.dim + 1) if isinstance(pl, Shard) else pl for pl in like.placements]
    shape = (len(rows), *like.shape)
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, like.device_mesh, placements, shape=shape, stride=stride).full_tensor()


def sharded_rows(
    logits: Tensor,
    residual: Tensor,
    chunks: int,
    params: Sequence[Tensor],
    every_param: Iterable[Tensor],
) -> list[Tensor]:
    """Per parameter ``[c, *shape]`` (whole, alike on every process): row j the gradient
    ``uⱼ = Σᵢ Jᵢᵀ rᵢ`` over chunk j of *every* process's rows (``residual``: ``rᵢ`` for this process's
    rows of ``logits``), one backward through FSDP per chunk. FSDP averages each chunk's gradient over
    processes, so it is multiplied by the number of processes: the global chunk's sum. Every process
    runs the same number of backwards (the largest chunk count; a process with fewer runs zeros)."""
    batch = logits.shape[0]
    count = torch.tensor([chunks], device=logits.device)
    if distributed.world_size() > 1:
        torch.distributed.all_reduce(count, op=torch.distributed.ReduceOp.MAX)
    total = int(count.item())  # a host read: the number of collectives must agree
    every_param, world = list(every_param), distributed.world_size()
    chunk_of_row = torch.arange(batch, device=logits.device) * chunks // batch
    per_chunk: list[list[Tensor]] = []
    for j in range(total):
        weights = residual * (chunk_of_row == j).to(residual.dtype)[:, None]
        loss = (logits * weights).sum()
        per_chunk.append(gradients_by_backward(loss, params, every_param, retain_graph=j < total - 1))
    return [gathered_rows([g[i] for g in per_chunk], p).mul_(world) for i, p in enumerate(params)]
