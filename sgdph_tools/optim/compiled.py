"""The step's arithmetic through ``torch.compile``: :meth:`SGDPH.compile_update <.sgdph.SGDPH.compile_update>`.

What is compiled is the arithmetic of the steps that repeat: the flat update of the second-order tensors
(:mod:`.flat`: momentum, the divisor cached from the last refresh, weight decay, the parameters' add; on
every step, refreshing ones too) and the first-order tensors' momentum SGD. Inductor fuses each into a
few kernels whatever the number of tensors; under ``mode="reduce-overhead"`` each is replayed as a CUDA
graph (one launch). The learning rate is a 0-d tensor on the parameters' device, refilled when the
scheduler changes it (no recompilation, no host-device synchronisation; a CUDA graph reads it from the
same address).

``SGDPH.compile_update`` also compiles GNB's sub-batch forward (``gnb_fraction``), the refreshing
steps' extra pass, as a graph of its own (:meth:`~sgdph_tools.curvature.recorded.RecordedForward.compile`).

What is not compiled, and why (the graph breaks, by design): the step's orchestration -- which step
refreshes, which tensors, the refresh counts -- is host logic on Python ints (compiled, each new step
number would be a new guard and a recompilation); the calls of ``backward`` and ``torch.autograd.grad``,
which dynamo does not trace (they run the compiled backward graphs); on a refreshing step, once per
``hessian_every`` steps, folding the estimates into the curvature EMA and rebuilding the cached divisor
(eager foreach kernels; the update itself is then the compiled flat one); steps on which some tensor has
no curvature yet (a round robin's first cycle); and the block rules' update. Results equal the
eager path's to rounding (inductor may fuse a multiply-add): not bit for bit.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

#: torch.compile's modes that suit a step: "default" (fused kernels) and "reduce-overhead" (CUDA graphs too)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune-no-cudagraphs", "max-autotune")


def flat_update(
    params: list[Tensor],
    grads: list[Tensor],
    buf: Tensor | None,
    denominator: Tensor,
    numerator: float,
    lr: Tensor,
    momentum: float,
    weight_decay: float,
) -> None:
    """:class:`~.flat.FlatSecondOrder`'s step (``buf`` its flat momentum) as one function of tensors."""
    grad = torch.cat(grads)
    if momentum != 0:
        buf.mul_(momentum).add_(grad)
        source = buf
    else:
        source = grad
    direction = source / denominator * numerator
    if weight_decay != 0:
        direction = direction + torch.cat(params) * weight_decay
    torch._foreach_sub_(params, torch._foreach_mul(list(direction.split([p.numel() for p in params])), lr))


def momentum_sgd(
    params: list[Tensor],
    grads: list[Tensor],
    bufs: list[Tensor],
    lr: Tensor,
    momentum: float,
    weight_decay: float,
) -> None:
    """torch's SGD (no dampening, not Nesterov) once every momentum buffer exists."""
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum != 0:
        torch._foreach_mul_(bufs, momentum)
        torch._foreach_add_(bufs, grads)
        grads = bufs
    torch._foreach_sub_(params, torch._foreach_mul(grads, lr))


class CompiledUpdate:
    """The compiled functions of one optimizer, and its learning rates as device tensors."""

    def __init__(self, mode: str = "default"):
        if mode not in COMPILE_MODES:
            raise ValueError(f"unknown compile mode {mode!r}: use one of {', '.join(COMPILE_MODES)}")
        self.mode = mode
        self.flat_update = torch.compile(flat_update, mode=mode, dynamic=False)
        self.momentum_sgd = torch.compile(momentum_sgd, mode=mode, dynamic=False)
        self._lr: dict[tuple[int, torch.device], tuple[float, Tensor]] = {}

    def lr(self, group: dict[str, Any], device: torch.device) -> Tensor:
        """The group's learning rate as a 0-d tensor on ``device``, the same tensor every step (refilled
        in place when it changes: a compiled graph or a CUDA graph keeps reading it)."""
        key = (id(group), device)
        value = float(group["lr"])
        held = self._lr.get(key)
        if held is None:
            held = (value, torch.tensor(value, device=device))
            torch._dynamo.mark_static_address(held[1])
        elif held[0] != value:
            held[1].fill_(value)
            held = (value, held[1])
        self._lr[key] = held
        return held[1]

    @staticmethod
    def static(params: list[Tensor], *tensors: Tensor | None) -> None:
        """Mark the tensors a compiled update keeps across steps -- parameters, optimizer state, the
        cached divisor -- as at fixed addresses (as torch's compiled optimizers do), so that CUDA graphs
        (``reduce-overhead``) read them in place instead of copying them in at every replay. Checked on
        the first and last parameter: a load or a new group brings new tensors, marked again."""
        if all(
            getattr(t, "_dynamo_static_input_type", None) for t in (params[0], params[-1], *tensors) if t is not None
        ):
            return
        for t in (*params, *tensors):
            if t is not None:
                torch._dynamo.mark_static_address(t)

    def sgd_group(self, state: dict[Tensor, dict[str, Any]], group: dict[str, Any]) -> bool:
        """A first-order group's step; False (nothing done) where the eager path must run (a tensor
        without its momentum buffer yet, tensors on several devices or of several dtypes)."""
        params = [p for p in group["params"] if p.grad is not None]
        if not params or len({(p.device, p.dtype) for p in params}) != 1:
            return False
        momentum = group["momentum"]
        bufs = [state[p].get("momentum_buffer") for p in params] if momentum != 0 else []
        if any(b is None for b in bufs):
            return False
        grads = [p.grad for p in params]
        self.static(params + bufs)
        self.momentum_sgd(params, grads, bufs, self.lr(group, params[0].device), momentum, group["weight_decay"])
        return True
