"""SGD with Partial Hessian (SGD-PH), in the style of ``torch/optim/sgd.py``."""
from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.sgd import sgd as sgd_functional

from .. import distributed
from ..hessian import (
    ENGINES,
    ESTIMATORS,
    HVP,
    AutogradHVP,
    FiniteDifferenceHVP,
    ForwardReplay,
    check_choice,
    estimate,
)

__all__ = ["SGDPH"]

# Key of the optimizer-wide entry in ``optimizer.state`` (torch's state_dict keeps non-parameter
# keys as they are): the step count and the Hutchinson generator's state.
SCHEDULE_KEY = "sgdph"

_MISSING_GRAPH = (
    "SGDPH needs the gradient graph of the second-order parameters to estimate their Hessian: "
    "call loss.backward(create_graph=True) before optimizer.step(), or let the optimizer run the "
    "backward pass itself with optimizer.step(loss_fn=fn), fn() returning the loss"
)


class SGDPH(Optimizer):
    r"""SGD with momentum, plus a Newton-type step for channel-wise 1-D parameters.

    .. code-block:: text

        input: lr (γ), momentum (β), weight_decay (λ), so_lr (τ), hessian_momentum (α), eps (ε),
               second-order flag per param group, estimator, hessian_every (k)
        for t = 1, 2, ...:
            g ← ∇L(θ)
            buf ← g                       if t is the param's first step or β = 0
                  β·buf + g               otherwise                   (no dampening)
            first-order params:  exactly torch.optim.SGD(lr=γ, momentum=β, weight_decay=λ):
                buf ← β·buf + (g + λθ);  θ ← θ - γ·buf                 (coupled weight decay)
            second-order params (buf holds gradients only):
                if (t - 1) mod k = 0 and the param is refreshed at this step:
                    h ← estimator's H-estimate at the current θ, before the update
                    D ← α·D + (1 - α)·|h|;   n ← n + 1                 (D = 0, n = 0 initially)
                if n = 0:  θ ← θ - γ·(buf + λθ)
                else:      θ ← θ - γ·(τ·buf / (D / (1 - αⁿ) + ε) + λθ)

    Refresh schedule: ``rowsum`` (and ``diagonal``) refresh ONE second-order tensor per refreshing
    step, round robin in parameter order (the tensor with the fewest refreshes so far, first in
    order: frozen or unused tensors are skipped without breaking the cycle); ``hutchinson``
    refreshes all of them with one HVP. A step is refreshing when ``(t - 1) % hessian_every == 0``.

    Which params are second-order: each param group carries ``second_order`` (True/False);
    :func:`~sgdph_tools.sgdph_param_groups` builds the groups from the parameter tags and keeps the
    classifier bias first-order. For plain params (groups without the key) the authors' rule is
    used: ``ndim == 1`` params are second-order except the LAST one, which is normally the
    classifier bias. Why it matters: under softmax cross-entropy the classifier bias has
    ``H·1 = 0`` exactly (as has a bias that feeds a BatchNorm), so its ``rowsum`` estimate is zero
    and its step would be ``τ/ε`` (10x with the defaults) times SGD's.

    Args:
        params: parameters or param groups (a group may set ``second_order`` and any of the
            hyperparameters below).
        lr: learning rate γ (default 0.1, the authors' default; the paper used 0.01 on CIFAR).
        momentum: momentum β of the gradient buffer (default 0.9).
        weight_decay: λ, coupled for first-order params, added after preconditioning for
            second-order params (default 0).
        so_lr: second-order learning rate τ (default 1e-3).
        hessian_momentum: α of the Hessian EMA (default 0.9).
        eps: ε added to the bias-corrected Hessian EMA (default 1e-4).
        estimator: ``"rowsum"`` (the paper's ``H_kk·1``), ``"hutchinson"`` (``z ⊙ Hz``, unbiased
            for the true diagonal) or ``"diagonal"`` (exact; one HVP per element: diagnostics).
        engine: ``"autograd"`` (double backward) or ``"finite_difference"`` (one extra forward and
            a 1-D-only backward, no ``create_graph``; needs ``step(loss_fn=...)``).
        hessian_every: refresh the Hessian every k steps (default 1).
        seed: seed of the Hutchinson probe vectors (offset by the process rank under DDP).
        foreach: use the multi-tensor (``torch._foreach_*``) update; default: on CUDA.
        buffers: module buffers (BatchNorm statistics) to put back after the finite-difference
            engine's extra forward; only needed for a ``torch.compile``'d model -- eager modules'
            buffers are found by a global forward hook (``model.buffers()`` is always safe to pass).

    Usage A (the paper's)::

        loss = criterion(model(x), y)
        loss.backward(create_graph=True)          # engine="autograd"
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    Usage B (the optimizer runs every backward pass itself, asking for exactly the gradients it
    needs; required for ``engine="finite_difference"``)::

        optimizer.step(loss_fn=lambda: criterion(model(x), y))    # fn: forward only, no backward

    ``step(closure)`` keeps torch's meaning (the closure zeroes the grads, calls backward and
    returns the loss). In usage B the optimizer zeroes the grads of its params first, computes them
    with ``torch.autograd.grad`` (so DDP's reducer is bypassed) and averages them across processes
    itself; the Hessian estimate is averaged across processes in every usage, so replicas never
    drift. With AMP, pass the GradScaler: usage A ``scaler.step(optimizer, grad_scaler=scaler)``,
    usage B ``optimizer.step(loss_fn=fn, grad_scaler=scaler)``; then ``scaler.update()``. The HVP
    of a scaled loss is scaled too, and the optimizer divides it by the scale.

    Departures from the paper and from the authors' code are listed in ``docs/algorithm.md``.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        so_lr: float = 1e-3,
        hessian_momentum: float = 0.9,
        eps: float = 1e-4,
        estimator: str = "rowsum",
        engine: str = "autograd",
        hessian_every: int = 1,
        seed: int = 0,
        foreach: bool | None = None,
        buffers: Iterable[Tensor] = (),
    ):
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay), ("so_lr", so_lr)):
            if not value >= 0.0:
                raise ValueError(f"invalid {name}: {value} (must be >= 0)")
        if not 0.0 <= hessian_momentum < 1.0:
            raise ValueError(f"invalid hessian_momentum: {hessian_momentum} (must be in [0, 1))")
        if not eps > 0.0:
            raise ValueError(f"invalid eps: {eps} (must be > 0)")
        if not (isinstance(hessian_every, int) and hessian_every >= 1):
            raise ValueError(f"invalid hessian_every: {hessian_every} (must be an integer >= 1)")
        check_choice("estimator", estimator, ESTIMATORS)
        check_choice("engine", engine, ENGINES)
        self.estimator, self.engine = estimator, engine
        self.hessian_every, self.seed = hessian_every, seed
        self.buffers = list(buffers)  # restored after the finite-difference engine's extra forwards
        self._generator: torch.Generator | None = None
        defaults = dict(
            lr=lr, momentum=momentum, weight_decay=weight_decay, so_lr=so_lr,
            hessian_momentum=hessian_momentum, eps=eps, foreach=foreach,
        )
        super().__init__(_decide_second_order(params), defaults)

    @property
    def is_second_order(self) -> bool:
        """timm's convention: True when the caller must run ``backward(create_graph=True)``."""
        return self.engine == "autograd"

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "second_order" in param_group:
            super().add_param_group(param_group)
        else:  # a group added later without the flag: the same rule, applied to this group alone
            for group in _decide_second_order([param_group]):
                super().add_param_group(group)

    # ------------------------------------------------------------------------- step

    def step(
        self,
        closure: Callable[[], Tensor] | None = None,
        *,
        loss_fn: Callable[[], Tensor] | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        max_grad_norm: float | None = None,
    ) -> Tensor | None:
        """One optimization step. See the class docstring for the two usages.

        ``max_grad_norm`` (usage B): clip the total gradient norm after the gradients are computed,
        averaged across processes and unscaled -- the caller cannot, since they appear inside step.
        The Hessian estimate is not clipped.
        """
        if closure is not None and loss_fn is not None:
            raise ValueError("pass either a closure (which calls backward) or loss_fn (which does not), not both")
        if loss_fn is None and self.engine == "finite_difference":
            raise RuntimeError(
                "engine='finite_difference' runs its own forward passes: call "
                "optimizer.step(loss_fn=fn), fn() returning the loss without calling backward"
            )
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        schedule = self.state.get(SCHEDULE_KEY, {"step": 0})
        step = schedule["step"] + 1
        second_order = [p for g in self.param_groups if g["second_order"] for p in g["params"] if p.requires_grad]
        refreshing = (step - 1) % self.hessian_every == 0 and bool(second_order)
        scaled = grad_scaler is not None and grad_scaler.is_enabled()

        if loss_fn is not None:
            loss, hvp_for = self._gradients_from_loss_fn(loss_fn, refreshing, grad_scaler if scaled else None)
            if scaled:
                grad_scaler.unscale_(self)  # records found_inf for scaler.update()
                if not _all_finite([p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]):
                    return loss  # skipped, like GradScaler.step: no state changes
            if max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(
                    [p for g in self.param_groups for p in g["params"] if p.grad is not None], max_grad_norm
                )
        else:
            if max_grad_norm is not None:
                raise ValueError("max_grad_norm is for usage B; in usage A clip .grad yourself before step()")
            hvp_for = self._hvp_from_backward_graph

        hessians: dict[Tensor, Tensor] = {}
        schedule = dict(schedule, step=step)
        if refreshing:
            refresh = self._choose_refresh([p for p in second_order if p.grad is not None])
            if refresh:
                generator = self._hutchinson_generator(schedule)
                scale = grad_scaler.get_scale() if scaled else 1.0
                hessians = self._estimate(refresh, hvp_for(refresh), scale, generator)
                if generator is not None:
                    schedule["rng_state"] = generator.get_state()

        with torch.no_grad():
            for group in self.param_groups:
                self._update_group(group, hessians)
        if loss_fn is None:  # usage A: free the double-backward graph that .grad holds
            for group in self.param_groups:
                for p in group["params"]:
                    if p.grad is not None and p.grad.requires_grad:
                        p.grad = p.grad.detach()
        # A new dict each step, never mutated in place: state_dict() hands out references.
        self.state[SCHEDULE_KEY] = schedule
        return loss

    # ------------------------------------------------------------------------- gradients and HVPs

    def _gradients_from_loss_fn(self, loss_fn, refreshing: bool, grad_scaler):
        """Usage B: run the forward, compute and write every gradient, and return the loss and a
        function that builds the HVP engine for the tensors chosen for refresh."""
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        first_loss: list[Tensor] = []

        def forward() -> Tensor:
            value = loss_fn()
            if not first_loss:
                first_loss.append(value)
            return grad_scaler.scale(value) if grad_scaler is not None else value

        self.zero_grad(set_to_none=True)
        replay = ForwardReplay(forward, {p.device for p in params}, self.buffers)
        create_graph = refreshing and self.engine == "autograd"
        with torch.enable_grad():
            grads = torch.autograd.grad(replay.first(), params, create_graph=create_graph, allow_unused=True)
        local = dict(zip(params, grads))  # this process's gradients, with graph when create_graph
        for p, g in local.items():
            if g is not None:
                p.grad = g.detach().clone() if create_graph else g
        # Our own backward bypasses DDP's reducer: average the gradients across processes here.
        distributed.all_reduce_mean_([p.grad for p in params if p.grad is not None])

        def hvp_for(refresh: list[Tensor]) -> HVP:
            if self.engine == "autograd":
                return AutogradHVP([local[p] for p in refresh], refresh)
            # The finite difference pairs the local gradient at θ with the local one at θ + r·v.
            return FiniteDifferenceHVP(replay, refresh, [local[p] for p in refresh])

        return first_loss[0].detach(), hvp_for

    def _hvp_from_backward_graph(self, refresh: list[Tensor]) -> HVP:
        """Usage A: HVPs through the graph that ``backward(create_graph=True)`` left in ``.grad``."""
        if not any(p.grad.requires_grad for g in self.param_groups for p in g["params"] if p.grad is not None):
            raise RuntimeError(_MISSING_GRAPH)
        return AutogradHVP([p.grad for p in refresh], refresh)

    def _choose_refresh(self, candidates: list[Tensor]) -> list[Tensor]:
        if self.estimator == "hutchinson" or not candidates:
            return candidates
        # Round robin, derived from the refresh counts: the fewest refreshes, first in order.
        counts = [self.state[p].get("hessian_refreshes", 0) for p in candidates]
        return [candidates[counts.index(min(counts))]]

    def _estimate(self, refresh: list[Tensor], hvp: HVP, scale: float, generator) -> dict[Tensor, Tensor]:
        with torch.enable_grad():
            h = estimate(self.estimator, hvp, refresh, range(len(refresh)), generator)
        h = [x.detach() for x in h]
        if scale != 1.0:
            torch._foreach_div_(h, scale)
        distributed.all_reduce_mean_(h)  # every replica gets the same estimate
        if not _all_finite(h):  # e.g. an fp16 overflow: keep the previous estimate
            return {}
        return dict(zip(refresh, h))

    def _hutchinson_generator(self, schedule: dict[str, Any]) -> torch.Generator | None:
        """The probe generator, at the state the schedule recorded (so a resumed run draws the same
        probes); seeded with ``seed + rank`` on first use: replicas draw independent probes and the
        all-reduce averages them."""
        if self.estimator != "hutchinson":
            return None
        if self._generator is None:
            self._generator = torch.Generator()
        if "rng_state" in schedule:
            self._generator.set_state(schedule["rng_state"])
        else:
            self._generator.manual_seed(self.seed + distributed.rank())
        return self._generator

    # ------------------------------------------------------------------------- updates

    def _update_group(self, group: dict[str, Any], hessians: dict[Tensor, Tensor]) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad.detach() for p in params]
        bufs = [self.state[p].get("momentum_buffer") for p in params]
        foreach = group["foreach"] if group["foreach"] is not None else all(p.is_cuda for p in params)
        if group["second_order"]:
            emas, counts = [], []
            for p in params:
                state = self.state[p]
                if "hessian_ema" not in state:
                    state["hessian_ema"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["hessian_refreshes"] = 0
                emas.append(state["hessian_ema"])
                counts.append(state["hessian_refreshes"])
            update = _second_order_multi_tensor if foreach else _second_order_single_tensor
            update(
                params, grads, bufs, emas, counts, [hessians.get(p) for p in params],
                lr=group["lr"], momentum=group["momentum"], weight_decay=group["weight_decay"],
                so_lr=group["so_lr"], hessian_momentum=group["hessian_momentum"], eps=group["eps"],
            )
            for p, n in zip(params, counts):
                self.state[p]["hessian_refreshes"] = n
        else:
            sgd_functional(
                params, grads, bufs, foreach=foreach,
                weight_decay=group["weight_decay"], momentum=group["momentum"], lr=group["lr"],
                dampening=0.0, nesterov=False, maximize=False,
            )
        if group["momentum"] != 0:
            for p, buf in zip(params, bufs):
                self.state[p]["momentum_buffer"] = buf


# ----------------------------------------------------------------------------- helpers


def _all_finite(tensors: list[Tensor]) -> bool:
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _decide_second_order(params: Iterable[Any]) -> list[dict[str, Any]]:
    """Give every param group a ``second_order`` flag; groups without one are split by the
    authors' rule: 1-D params are second-order, except the last 1-D param over all such groups."""
    groups = list(params)
    if not groups:
        raise ValueError("optimizer got an empty parameter list")
    if not isinstance(groups[0], dict):
        groups = [{"params": groups}]
    groups = [dict(g, params=[g["params"]] if isinstance(g["params"], Tensor) else list(g["params"])) for g in groups]

    def tensor(p):  # torch also accepts (name, tensor) pairs
        return p[1] if isinstance(p, tuple) else p

    undecided = [g for g in groups if "second_order" not in g]
    one_d = [(id(g), i) for g in undecided for i, p in enumerate(g["params"]) if tensor(p).ndim == 1]
    last = one_d[-1] if one_d else None
    decided = []
    for g in groups:
        if "second_order" in g:
            decided.append(g)
            continue
        flags = [tensor(p).ndim == 1 and (id(g), i) != last for i, p in enumerate(g["params"])]
        for flag in (True, False):
            picked = [i for i, f in enumerate(flags) if f == flag]
            if picked:
                part = dict(g, params=[g["params"][i] for i in picked], second_order=flag)
                if "param_names" in g:
                    part["param_names"] = [g["param_names"][i] for i in picked]
                decided.append(part)
    return decided


def _second_order_single_tensor(
    params: list[Tensor], grads: list[Tensor], bufs: list[Tensor | None], emas: list[Tensor],
    counts: list[int], hessians: list[Tensor | None], *, lr: float, momentum: float,
    weight_decay: float, so_lr: float, hessian_momentum: float, eps: float,
) -> None:
    """The second-order update, one tensor at a time; ``bufs`` and ``counts`` are updated in place."""
    for i, p in enumerate(params):
        g = grads[i]
        if momentum != 0:
            if bufs[i] is None:
                bufs[i] = torch.clone(g).detach()
            else:
                bufs[i].mul_(momentum).add_(g)
            buf = bufs[i]
        else:
            buf = g
        if hessians[i] is not None:
            emas[i].mul_(hessian_momentum).add_(hessians[i].abs(), alpha=1 - hessian_momentum)
            counts[i] += 1
        if counts[i] == 0:
            direction = buf.add(p, alpha=weight_decay) if weight_decay != 0 else buf
        else:
            denom = emas[i].div(1 - hessian_momentum ** counts[i]).add_(eps)
            direction = buf.div(denom).mul_(so_lr)
            if weight_decay != 0:
                direction.add_(p, alpha=weight_decay)
        p.add_(direction, alpha=-lr)


def _second_order_multi_tensor(
    params: list[Tensor], grads: list[Tensor], bufs: list[Tensor | None], emas: list[Tensor],
    counts: list[int], hessians: list[Tensor | None], *, lr: float, momentum: float,
    weight_decay: float, so_lr: float, hessian_momentum: float, eps: float,
) -> None:
    """The same update as :func:`_second_order_single_tensor` with ``torch._foreach_*`` kernels."""
    if momentum != 0:
        old = [i for i, b in enumerate(bufs) if b is not None]
        for i, b in enumerate(bufs):
            if b is None:
                bufs[i] = torch.clone(grads[i]).detach()
        if old:
            torch._foreach_mul_([bufs[i] for i in old], momentum)
            torch._foreach_add_([bufs[i] for i in old], [grads[i] for i in old])
        active = bufs
    else:
        active = grads
    fresh = [i for i, h in enumerate(hessians) if h is not None]
    if fresh:
        torch._foreach_mul_([emas[i] for i in fresh], hessian_momentum)
        torch._foreach_add_(
            [emas[i] for i in fresh], torch._foreach_abs([hessians[i] for i in fresh]),
            alpha=1 - hessian_momentum,
        )
        for i in fresh:
            counts[i] += 1
    directions: list[Tensor | None] = [None] * len(params)
    pre = [i for i, n in enumerate(counts) if n > 0]
    raw = [i for i, n in enumerate(counts) if n == 0]
    if pre:
        denoms = torch._foreach_div([emas[i] for i in pre], [1 - hessian_momentum ** counts[i] for i in pre])
        torch._foreach_add_(denoms, eps)
        pre_dirs = torch._foreach_div([active[i] for i in pre], denoms)
        torch._foreach_mul_(pre_dirs, so_lr)
        if weight_decay != 0:
            torch._foreach_add_(pre_dirs, [params[i] for i in pre], alpha=weight_decay)
        for i, d in zip(pre, pre_dirs):
            directions[i] = d
    if raw:
        raw_bufs = [active[i] for i in raw]
        raw_dirs = (
            torch._foreach_add(raw_bufs, [params[i] for i in raw], alpha=weight_decay)
            if weight_decay != 0
            else raw_bufs
        )
        for i, d in zip(raw, raw_dirs):
            directions[i] = d
    torch._foreach_add_(params, directions, alpha=-lr)
