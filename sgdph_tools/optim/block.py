r"""The ``block_newton`` rule: a Newton step on each second-order tensor's own Gauss-Newton block.

For a second-order tensor k with momentum buffer m (the gradient when β = 0)::

    (G_kk + εI) d = m,      θ ← θ - γ·(τ·d + λθ)

``G_kk`` is the tensor's block of the generalised Gauss-Newton matrix -- curvature exact *within*
the tensor, ignored across tensors (Zhang et al. 2017's block-diagonal idea at SGD-PH's granularity),
ε the group's ``eps`` as damping, τ its ``so_lr`` and λ its weight decay (decoupled, as every rule's).
Two ways to get ``G_kk``:

- **cheap** (``estimator="gnb"``, the default): an exponential average (α = ``hessian_momentum``,
  bias-corrected) of Gauss-Newton-Bartlett blocks ``(1/b)·Σⱼ uⱼuⱼᵀ``, ``uⱼ`` the sampled-label
  gradient of chunk j of the (sub-)batch's rows (``block_chunks`` chunks, one batched backward) --
  unbiased for the block, as ``b·ĝ⊙ĝ`` is for its diagonal, and of rank up to ``block_chunks`` per
  refresh: the one-chunk ``b·ĝĝᵀ`` (rank one) leaves most of the block to the damping --
  refreshed every ``hessian_every`` steps. After each refresh the
  damped blocks are inverted once (Cholesky in float64, stacked by size); a step between refreshes is
  one batched matrix-vector product per block size. Tensors with more than ``block_max`` entries keep
  the block's diagonal only (``d = m / (D̂ + ε)``): a dense block costs n² floats, and Σn² grows
  with the width (resnet50: 2.2x its parameters for every 1-D tensor as a block; 0.3x with
  ``block_max=512``).
- **exact** (``engine="gauss_newton"``): conjugate gradient (:mod:`sgdph_tools.curvature.cg`) on exact
  GGN-vector products of the step's batch restricted to the block, at most ``cg_steps`` products per
  tensor, at every step (``hessian_every`` must be 1; nothing is averaged: ``hessian_momentum`` is not
  used; any size). A reference for small networks: #tensors × ``cg_steps`` products per step.

Before a tensor's first estimate, it takes SGD's step (``d = m``, τ not applied), as the other rules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..curvature.cg import conjugate_gradient
from ..curvature.sharded import global_value, local_like

BLOCK_RULE = "block_newton"
#: The same blocks, scale-free (as ``normalized`` is for the diagonal): the damped block solve with ε
#: relative to the block's mean diagonal gives the direction, SGD's step its length (|step| = |m| per
#: tensor; τ unused). block_newton's τ·d has no natural size: measured, it ranges 0.03-6x SGD's step
#: across the tensors of one net (docs/evidence.md).
NORMALIZED_BLOCK_RULE = "block_normalized"
BLOCK_RULES = (BLOCK_RULE, NORMALIZED_BLOCK_RULE)
#: Largest tensor (entries) whose whole block the cheap mode keeps: every 1-D tensor of resnet18_cifar
#: (64-512 channels); on resnet50 the 1024- and 2048-channel tensors keep their diagonal.
DEFAULT_BLOCK_MAX = 512
#: CG iterations per tensor and step in the exact mode (Zhang et al. cap CG at a few tens of iterations
#: per block too); ``cg_steps`` ≥ a tensor's size solves its block exactly.
DEFAULT_CG_STEPS = 10

#: Chunks of the (sub-)batch's rows whose sampled-label gradients make one block estimate (None: one
#: per row, per-example gradients). ``sgdph hessian`` measured it: averaged over 10 refreshes, one chunk
#: (``b·ĝĝᵀ``, rank one) and 8 chunks precondition worse than SGD; one per row (32) much better.
DEFAULT_BLOCK_CHUNKS = None

#: ``product(k, v) = G_kk v`` for the k-th exactly solved tensor of a step
BlockProduct = Callable[[int, Tensor], Tensor]


def is_block_group(group: dict[str, Any]) -> bool:
    """Whether the group's second-order tensors take a block rule."""
    return bool(group["second_order"]) and group.get("rule") in BLOCK_RULES


def keeps_block(group: dict[str, Any], p: Tensor, exact: bool) -> bool:
    """Whether ``p`` keeps a dense curvature block in its state (cheap mode, small enough)."""
    return group.get("rule") in BLOCK_RULES and not exact and p.numel() <= group["block_max"]


def exact_mode(groups: list[dict[str, Any]], estimator: str, engine: str, hessian_every: int) -> bool:
    """Whether ``block_newton`` groups are solved exactly (``engine="gauss_newton"``); checks that the
    optimizer-wide choices give them Gauss-Newton curvature."""
    blocks = any(is_block_group(g) for g in groups)
    exact = blocks and engine == "gauss_newton"
    if exact and any(is_block_group(g) and g["rule"] == NORMALIZED_BLOCK_RULE for g in groups):
        raise ValueError(
            "rule='block_normalized' takes its damping relative to the block's estimated diagonal: use "
            "estimator='gnb' (the block estimate), or rule='block_newton' for the exact CG solve"
        )
    if blocks and not exact and estimator != "gnb":
        raise ValueError(
            f"rule='block_newton' needs Gauss-Newton curvature, not estimator={estimator!r} with "
            f"engine={engine!r}: use estimator='gnb' (the block estimate) or engine='gauss_newton' (exact CG)"
        )
    if exact and hessian_every != 1:
        raise ValueError(
            "rule='block_newton' with engine='gauss_newton' solves each step's exact blocks: hessian_every must be "
            f"1 (got {hessian_every}); for a refresh every k steps use estimator='gnb'"
        )
    return exact


def exactly_solved(groups: list[dict[str, Any]]) -> list[Tensor]:
    """The tensors the exact mode solves this step (those with a gradient)."""
    return [p for g in groups if is_block_group(g) for p in g["params"] if p.grad is not None]


def block_estimates(groups: list[dict[str, Any]], refresh: list[Tensor], exact: bool) -> list[bool] | None:
    """Which of ``refresh`` get a whole-block estimate (the cheap mode); None: none do."""
    block_groups = [g for g in groups if is_block_group(g)]
    if not block_groups:
        return None
    keeps = {p for g in block_groups for p in g["params"] if keeps_block(g, p, exact)}
    return [p in keeps for p in refresh]


class BlockInverses:
    """One group's damped, bias-corrected block inverses ``(Ĝ + εI)⁻¹``, stacked by (size, device,
    dtype); rebuilt after a refresh and after a load (from the state alone: a resumed run computes
    the same inverses)."""

    def __init__(self) -> None:
        self.valid = False
        self.stacks: list[tuple[list[Tensor], Tensor]] = []

    def rebuild(
        self, state: dict[Tensor, dict[str, Any]], params: list[Tensor], alpha: float, eps: float, relative: bool
    ) -> None:
        """``relative``: ε in units of each block's mean diagonal (``block_normalized``)."""
        by_shape: dict[tuple, list[Tensor]] = {}
        for p in params:
            by_shape.setdefault((p.numel(), p.device, p.dtype), []).append(p)
        self.stacks = []
        for (_, _, dtype), members in by_shape.items():
            blocks = torch.stack(
                [state[p]["hessian_block"].double() / (1 - alpha ** state[p]["hessian_refreshes"]) for p in members]
            )
            if relative:  # Ĝ / mean(diag Ĝ): a block of zeros (an unused tensor) stays zero
                scale = blocks.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(torch.finfo(blocks.dtype).tiny)
                blocks = blocks / scale[:, None, None]
            blocks.diagonal(dim1=-2, dim2=-1).add_(eps)
            factor, info = torch.linalg.cholesky_ex(blocks)
            # A host read at a refresh only: a block the float64 Cholesky cannot factor (it is PSD plus
            # εI, so only NaN or overflow gets here) is inverted through its clamped eigenvalues.
            if bool((info != 0).any()):
                values, vectors = torch.linalg.eigh(torch.nan_to_num(blocks))
                inverse = vectors @ torch.diag_embed(values.clamp_min(eps).reciprocal()) @ vectors.mT
            else:
                inverse = torch.cholesky_inverse(factor)
            self.stacks.append((members, inverse.to(dtype)))
        self.valid = True


def block_newton_group(
    state: dict[Tensor, dict[str, Any]],
    group: dict[str, Any],
    hessians: dict[Tensor, Tensor],
    inverses: BlockInverses,
    product: BlockProduct | None,
    exact_index: dict[Tensor, int],
) -> bool:
    """Update one ``block_newton`` group in place; True when it had tensors to update. ``hessians``:
    fresh estimates (``[n, n]`` blocks, or diagonals for tensors above ``block_max``); ``product``
    and ``exact_index``: the exact mode's block products and each tensor's index in them."""
    params = [p for p in group["params"] if p.grad is not None]
    if not params:
        return False
    momentum, lr, wd, so_lr, eps = (group[k] for k in ("momentum", "lr", "weight_decay", "so_lr", "eps"))
    normalized = group["rule"] == NORMALIZED_BLOCK_RULE
    alpha = group["hessian_momentum"]
    bufs = _momentum_buffers(state, params, momentum)
    states = [state[p] for p in params]
    torch._foreach_add_([s["step"] for s in states], 1.0)
    directions: list[Tensor] = []
    if product is not None:
        for p, m in zip(params, bufs):
            k = exact_index[p]
            solved = conjugate_gradient(
                lambda v, k=k: product(k, v.view_as(p)).reshape(-1),
                m.reshape(-1),
                damping=eps,
                max_iters=group["cg_steps"],
            )
            directions.append(solved.solution.view_as(p).mul_(so_lr))  # exact: block_newton only
    else:
        _average_fresh(states, [hessians.get(p) for p in params], alpha, inverses)
        if not inverses.valid:
            blocked = [p for p in group["params"] if "hessian_block" in state[p] and state[p]["hessian_refreshes"]]
            inverses.rebuild(state, blocked, alpha, eps, relative=normalized)
        solved = _apply_inverses(inverses, dict(zip(params, bufs)))
        for p, m, s in zip(params, bufs, states):
            if s["hessian_refreshes"] == 0:
                directions.append(m.clone())  # no curvature yet: SGD's step
                continue
            if p in solved:
                d = solved[p]
            else:  # above block_max: the block's diagonal
                curvature = s["hessian_ema"] / (1 - alpha ** s["hessian_refreshes"])
                if normalized:
                    curvature.div_(curvature.mean().clamp_min(torch.finfo(curvature.dtype).tiny))
                d = m.div(curvature.add_(eps))
            # block_normalized: SGD's length, |d| = |m| (norms on the device: no host read)
            directions.append(
                d.mul_(m.norm() / d.norm().clamp_min(torch.finfo(d.dtype).tiny)) if normalized else d.mul_(so_lr)
            )
    if wd != 0:
        torch._foreach_add_(directions, params, alpha=wd)
    torch._foreach_add_(params, directions, alpha=-lr)
    return True


def _momentum_buffers(state: dict[Tensor, dict[str, Any]], params: list[Tensor], momentum: float) -> list[Tensor]:
    """m ← β·m + g (g itself on the first step, or with β = 0), as SGD-PH's other rules."""
    grads = [p.grad for p in params]
    if momentum == 0:
        return grads
    bufs = []
    for p, g in zip(params, grads):
        buf = state[p].get("momentum_buffer")
        if buf is None:
            buf = state[p]["momentum_buffer"] = torch.clone(g).detach()
        else:
            bufs.append(buf.mul_(momentum).add_(g))
            continue
        bufs.append(buf)
    return bufs


def _average_fresh(states: list[dict[str, Any]], fresh: list[Tensor | None], alpha: float, inverses) -> None:
    """Fold fresh estimates into the exponential averages; a fresh block invalidates the inverses."""
    for s, h in zip(states, fresh):
        if h is None:
            continue
        key = "hessian_block" if "hessian_block" in s else "hessian_ema"
        s[key].mul_(alpha).add_(h.abs() if key == "hessian_ema" else h, alpha=1 - alpha)
        s["hessian_refreshes"] += 1
        inverses.valid = inverses.valid and key == "hessian_ema"


def _apply_inverses(inverses: BlockInverses, bufs: dict[Tensor, Tensor]) -> dict[Tensor, Tensor]:
    """``(Ĝ + εI)⁻¹ m`` for every tensor with an inverse and a buffer this step: one batched product
    per block size."""
    out: dict[Tensor, Tensor] = {}
    for members, inverse in inverses.stacks:
        rows = [i for i, p in enumerate(members) if p in bufs]
        if not rows:
            continue
        # FSDP2 shards: each buffer gathered whole, solved alike on every process, its shard kept
        stacked = torch.stack([global_value(bufs[members[i]]).reshape(-1) for i in rows]).unsqueeze(-1)
        chosen = inverse if len(rows) == len(members) else inverse[rows]
        for i, d in zip(rows, torch.bmm(chosen, stacked).squeeze(-1).unbind(0)):
            out[members[i]] = local_like(d.view(members[i].shape), members[i])
    return out
