"""The host-light update of a second-order param group: flat state, a divisor cached between refreshes.

SGD-PH's second-order tensors are many and small (41-107 1-D tensors in resnet18_cifar, resnet50,
vit_small): updated one tensor at a time -- or with foreach, which on a CPU is a loop of per-tensor
kernels in C++ -- each step costs several passes of per-tensor dispatch. Here their state lives in
flat buffers, one per (group, device, dtype): the momentum buffers, the Hessian EMAs and the step
counters are *views* into them, so ``optimizer.state[p]`` is per parameter as before (checkpoints and
``torch.distributed.checkpoint`` see the same entries), and every update of a view -- the general
path's, on a refresh -- updates the flat buffer. The parameters themselves are not rebound (``p.data``
stays the caller's: ``model.to()`` and FSDP2's DTensors keep working); their update is one foreach.

On a step that refreshes nothing, the curvature and its bias corrections are what they were at the
last refresh, so the step's divisor ``d`` (and numerator) are cached, computed by the general path's
own :func:`~.functional.step_denominators` on the per-tensor views (per-tensor means stay per-tensor
means). A step is then: one ``cat`` of the gradients, a constant number of flat kernels (momentum,
division, weight decay), one foreach over the parameters and one add to the step counters -- the same
per-element arithmetic as the general path, in the same order, so the results are bit-identical.

A refreshing step folds its fresh estimates into the curvature EMA through the views first
(:func:`.update.refreshed_flat`) and is then a flat step too, its divisor rebuilt once for the steps
up to the next refresh. Where a case is rare, the general path runs instead (it keeps the flat buffers
coherent through the views): a tensor without a gradient, tensors with and without curvature mixed
(before the first refresh of every tensor), FSDP2's sharded parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from .compiled import CompiledUpdate
from .functional import step_denominators


class FlatSecondOrder:
    """One second-order group's 1-D tensors (same device, dtype, all contiguous) with flat state."""

    def __init__(self, params: list[Tensor], state: Mapping[Tensor, dict[str, Any]], momentum: float):
        self.params = params
        sizes = [p.numel() for p in params]
        with torch.no_grad():
            self.ema = torch.cat([state[p]["hessian_ema"].reshape(-1) for p in params])
            self.steps = torch.stack([state[p]["step"] for p in params])
            self.buf = torch.cat([state[p]["momentum_buffer"].reshape(-1) for p in params]) if momentum else None
        for i, (p, ema) in enumerate(zip(params, self.ema.split(sizes))):
            state[p]["hessian_ema"] = ema
            state[p]["step"] = self.steps[i]
        if self.buf is not None:
            for p, buf in zip(params, self.buf.split(sizes)):
                state[p]["momentum_buffer"] = buf
        self.grad = torch.empty_like(self.ema)
        self.theta = torch.empty_like(self.ema)
        self.direction = torch.empty_like(self.ema)
        self.direction_views = list(self.direction.split(sizes))
        self.cached_key: tuple | None = None
        # the cached divisor, rebuilt in place at each refresh (one address: a CUDA graph keeps reading it)
        self.denominator = torch.empty_like(self.ema)
        self.numerator = 1.0

    @staticmethod
    def fits(params: list[Tensor], state: Mapping[Tensor, dict[str, Any]], momentum: float) -> bool:
        if not params:
            return False
        first = params[0]
        if type(first) not in (torch.Tensor, torch.nn.Parameter):  # a subclass (FSDP2's DTensor) shards
            return False
        return all(
            p.ndim == 1
            and p.is_contiguous()
            and p.device == first.device
            and p.dtype == first.dtype
            and type(p) is type(first)  # no tensor subclasses (DTensor): they shard, flat buffers do not
            and "hessian_ema" in state[p]
            and "step" in state[p]
            and (momentum == 0 or "momentum_buffer" in state[p])
            for p in params
        )

    def invalidate(self) -> None:
        """The curvature or its corrections changed (a refresh, or the general path ran)."""
        self.cached_key = None

    def step(
        self,
        group: dict[str, Any],
        state: Mapping[Tensor, dict[str, Any]],
        corrections: Callable[[], list[float | None]],
        correction_key: Any,
        compiled: CompiledUpdate | None = None,
    ) -> bool:
        """Update every tensor; False (nothing done) where the general path must run instead.
        ``corrections()`` gives the bias corrections (None: no curvature yet) when the cached divisor
        is rebuilt; ``correction_key`` changes whenever they may have changed without a refresh.
        ``compiled``: the same arithmetic through torch.compile (:mod:`.compiled`)."""
        params = self.params
        grads = [p.grad for p in params]
        if any(g is None for g in grads):
            return False
        rule = group.get("rule", "paper")
        key = (rule, group["eps"], group["so_lr"], group["hessian_momentum"], group["authors_code"], correction_key)
        if key != self.cached_key:
            corrections = corrections()
            if any(c is None for c in corrections):
                return False  # some tensor has no curvature yet: its step is SGD's, the others' are not
            views = [state[p]["hessian_ema"] for p in params]
            denominators, self.numerator = step_denominators(
                views,
                corrections,
                so_lr=group["so_lr"],
                eps=group["eps"],
                eps_in_correction=group["authors_code"],
                rule=rule,
            )
            torch.cat(denominators, out=self.denominator)
            self.cached_key = key
        momentum, weight_decay = group["momentum"], group["weight_decay"]
        self.steps.add_(1.0)
        if compiled is not None:
            lr = compiled.lr(group, self.ema.device)
            compiled.static(params, self.buf, self.denominator)
            compiled.flat_update(params, grads, self.buf, self.denominator, self.numerator, lr, momentum, weight_decay)
            return True
        torch.cat(grads, out=self.grad)
        if momentum != 0:
            self.buf.mul_(momentum).add_(self.grad)
            source = self.buf
        else:
            source = self.grad
        torch.div(source, self.denominator, out=self.direction)
        self.direction.mul_(self.numerator)
        if weight_decay != 0:
            torch.cat(params, out=self.theta)
            self.direction.add_(self.theta, alpha=weight_decay)
        torch._foreach_add_(params, self.direction_views, alpha=-group["lr"])
        return True
