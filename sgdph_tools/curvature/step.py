"""From the way a user drives an optimizer step to gradients and a curvature estimate.

An optimizer that preconditions with curvature is driven in three ways (``docs/algorithm.md``):

- **A**, a standard loop: the caller's ``loss.backward(create_graph=...)`` left gradients -- with
  their graph when the estimate needs one -- in ``.grad``; products go through that graph.
- **closure**, as ``torch.optim.LBFGS`` takes one: it zeroes the grads, runs forward and backward and
  returns the loss (or ``(loss, logits)``); finite differences call it again at a perturbed point.
- **B**, ``loss_fn``: forward only; the backward is run here, so DDP, AMP and clipping can sit
  between the gradients and the update.

:class:`StepCurvature` turns each into :class:`StepGradients` -- the loss, the logits, ``.grad`` set
(averaged across processes where the backward bypassed DDP's reducer, unscaled under AMP) -- and then
into a curvature estimate for the tensors chosen for refresh. It owns what that needs from the model:
the sub-batch GNB's input recorder (a forward pre-hook, removed by :meth:`StepCurvature.close`) and
the activation reuse of finite differences. It holds no reference to the optimizer.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from .. import distributed
from .activation_reuse import ActivationReuse
from .capabilities import Needs, needs
from .estimators import estimate
from .gauss_newton import (
    GGNVectorProduct,
    SubBatchGNB,
    bartlett_curvature,
    bartlett_gradients,
    bartlett_row_curvature,
    bartlett_rows,
)
from .products import AutogradHVP, FiniteDifferenceHVP, Product, math_attention, no_double_backward_error
from .replay import ActivationCut, ClosureReplay, ForwardReplay, cuda_indices
from .sharded import DTensor, is_sharded, local_like

MISSING_GRAPH = (
    "SGDPH needs the gradient graph of the second-order parameters to estimate their Hessian: call "
    "loss.backward(create_graph=optimizer.is_second_order) before optimizer.step() (or in the closure), "
    "or let the optimizer run the backward itself with optimizer.step(loss_fn=fn)"
)
NEEDS_CLOSURE = (
    "engine='finite_difference' re-evaluates the loss at a perturbed point: call optimizer.step(closure) "
    "with a standard closure (zero the grads, forward, loss.backward(), return the loss), or "
    "optimizer.step(loss_fn=fn), fn() returning the loss without calling backward"
)
NEEDS_LOGITS = (
    "estimator='gnb' and engine='gauss_newton' read the logits: return (loss, logits) from the closure or "
    "from loss_fn, e.g. optimizer.step(loss_fn=lambda: (criterion(logits := model(x), y), logits))"
)
GRAPH_FREED = (
    "the logits' graph was freed by the closure's backward: call loss.backward(create_graph="
    "optimizer.is_second_order) in the closure (it keeps the graph), or use optimizer.step(loss_fn=...)"
)
DDP_DOUBLE_BACKWARD = (
    "DistributedDataParallel cannot run backward(create_graph=True): pass model=<the DDP module> to SGDPH "
    "(the optimizer then runs the closure under no_sync() and averages the gradients itself), or call "
    "optimizer.step(loss_fn=fn), or use engine='finite_difference'"
)
SCALE_UNKNOWN = (
    "the gradients were unscaled before step() (scaler.unscale_), but the Hessian-vector products go through "
    "the backward graph of the scaled loss and no GradScaler is stepping this optimizer to read the scale "
    "from: call scaler.step(optimizer), or use optimizer.step(loss_fn=fn, scaler=scaler)"
)


@dataclass
class AmpScale:
    """What the optimizer knows of a loss scale this step. ``scaler``: a GradScaler to scale, unscale
    and check with (usage B's ``scaler=``); otherwise torch's protocol: ``grad_scale`` (the gradients
    are still scaled by it; None once the caller unscaled them) and ``found_inf``, which GradScaler
    sets on the optimizer before it calls ``step``."""

    scaler: torch.amp.GradScaler | None = None
    grad_scale: Tensor | None = None
    found_inf: Tensor | None = None

    @property
    def active(self) -> bool:
        return (self.scaler is not None and self.scaler.is_enabled()) or self.found_inf is not None


@dataclass
class StepGradients:
    """One step's gradients (in ``.grad``) and how to get products for the estimate."""

    loss: Tensor | None
    logits: Tensor | None
    product_for: Callable[[list[Tensor]], Product]
    #: the products come from a graph of the loss times this scale (None: unscaled; a function: read
    #: it when needed)
    product_scale: Tensor | float | Callable[[], float] | None = None
    #: a gradient is not finite under a loss scale: the step is skipped, as GradScaler would
    skipped: bool = False


class StepCurvature:
    """Gradients and curvature estimates for an optimizer step; ``model`` is optional (see SGDPH)."""

    def __init__(self, model: nn.Module | None = None):
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module (the one the closure runs), got {type(model).__name__}")
        self.model = model
        #: finite differences along one tensor reuse the activations below it (needs ``model``; exact:
        #: :mod:`.activation_reuse`); False: every perturbed forward runs in full
        self.reuse_activations = True
        self._activation_reuse: ActivationReuse | None = None
        # Records the model's inputs for the sub-batch GNB (registered whenever a model is given: a
        # loaded checkpoint may switch gnb_fraction on); recording only while configured so.
        self._sub_batch = SubBatchGNB(model, list(model.buffers()), enabled=False) if model is not None else None
        self._compiled_model = False  # compile_passes(): the model the closure runs is compiled
        self.configure("rowsum", "autograd", None)

    def configure(self, estimator: str, engine: str, gnb_fraction: float | None, exact_blocks: bool = False) -> None:
        """``exact_blocks``: some tensors are solved on their exact GGN block every step
        (:meth:`block_product`), which reads the logits whatever the estimator."""
        if gnb_fraction is not None and estimator == "gnb" and self.model is None:
            raise ValueError(
                "gnb_fraction needs model=<the module the loss runs>: the sub-batch is taken from its recorded inputs"
            )
        self.estimator, self.engine = estimator, engine
        self.gnb_fraction = gnb_fraction if estimator == "gnb" else None
        self.exact_blocks = exact_blocks
        #: block estimates come from this many chunks of the (sub-)batch's rows (``bartlett_rows``)
        self.block_chunks = getattr(self, "block_chunks", None)
        self.needs: Needs = needs(estimator, engine, self.gnb_fraction, exact_blocks)
        if self._sub_batch is not None:
            self._sub_batch.enabled = self.gnb_fraction is not None

    def compile_passes(self, mode: str, sub_batch: bool = True) -> None:
        """Compile the curvature's own forward on a sub-batch (``gnb_fraction``; not with ``sub_batch=False``:
        under FSDP2 it runs the sharded module eagerly), the refreshing steps' extra pass; the other
        estimates run the caller's (compiled or not) model. Finite differences stop reusing activations:
        the hooks that cut the forward at a layer, on a compiled model, make it recompile (measured: 84x
        SGDM's step on small_cnn), whichever module ``model=`` named."""
        self.reuse_activations = False
        # the replays restore the model's buffers from a list, without the global hook (it recompiles)
        self._compiled_model = self.model is not None
        if self._sub_batch is not None and sub_batch:
            self._sub_batch.compile(mode)

    def close(self) -> None:
        """Remove the hook this object put on the model (idempotent)."""
        if self._sub_batch is not None:
            self._sub_batch.remove()

    # ------------------------------------------------------------------------- activation reuse

    def reuses_activations(self) -> bool:
        """Whether finite differences along one tensor can start at its layer: the round-robin
        estimators on the finite-difference engine, with a plain model (not DDP, not compiled)."""
        return (
            self.reuse_activations
            and self.engine == "finite_difference"
            and not self.needs.refreshes_all
            and self.model is not None
            and not isinstance(self.model, nn.parallel.DistributedDataParallel)
            and not is_compiled(self.model)
            and not is_sharded(self.model.parameters())  # FSDP2 gathers each layer in its own forward hook
        )

    def activations_to_reuse(self, target: Tensor, devices: set[torch.device]) -> ActivationCut | None:
        """The record of the activations below ``target``, which the perturbed forward reuses (None
        once reuse was switched off for the model)."""
        if self._activation_reuse is None:
            self._activation_reuse = ActivationReuse(self.model, cuda_indices(devices))
        return self._activation_reuse.for_target(target)

    # ------------------------------------------------------------------------- gradients

    def gradients(
        self,
        optimizer: torch.optim.Optimizer,
        params: list[Tensor],
        second_order: list[Tensor],
        *,
        closure: Callable[[], Any] | None,
        loss_fn: Callable[[], Any] | None,
        refreshing: bool,
        amp: AmpScale,
        cut: ActivationCut | None = None,
    ) -> StepGradients:
        """Run the usage's forward and backward (none for usage A), average and unscale the gradients.
        ``params``: every parameter of the optimizer; ``second_order``: those that get estimates."""
        if loss_fn is not None or closure is not None:
            devices = {p.device for p in params}
        if loss_fn is not None:
            grads = self._from_loss_fn(loss_fn, params, devices, refreshing, amp, cut)
        elif closure is not None:
            grads = self._from_closure(closure, params, second_order, devices, refreshing, cut)
        else:
            grads = StepGradients(None, None, self._from_backward_graph(params))
        self._unscale(optimizer, params, grads, amp, from_caller_graph=closure is None and loss_fn is None)
        return grads

    def _unscale(self, optimizer, params: list[Tensor], grads: StepGradients, amp: AmpScale, from_caller_graph):
        if not amp.active:
            return
        with_grad = [p.grad for p in params if p.grad is not None]
        if amp.scaler is not None:  # a GradScaler handed to step(): the pre-protocol way, and usage B's
            try:
                amp.scaler.unscale_(optimizer)  # records found_inf for scaler.update()
            except RuntimeError as error:  # the caller unscaled already (e.g. to clip): fine
                if "already been called" not in str(error):
                    raise
            grads.product_scale = amp.scaler.get_scale  # read (a host sync) only when an estimate needs it
            # a host decision: skipping the step changes what runs next (estimate, counters)
            grads.skipped = not all_finite(with_grad)
            return
        # torch's protocol (GradScaler.step sets grad_scale and found_inf on the optimizer)
        grads.skipped = bool(amp.found_inf)  # host decision, as above: torch's own _maybe_opt_step syncs too
        if amp.grad_scale is not None:
            inv_scale = amp.grad_scale.double().reciprocal().float()  # as GradScaler.unscale_ computes it
            with torch.no_grad():
                for device in {g.device for g in with_grad}:
                    torch._foreach_mul_([g for g in with_grad if g.device == device], inv_scale.to(device))
            grads.product_scale = amp.grad_scale
        elif from_caller_graph and self.needs.double_backward:
            # Unscaled by the caller; the products still go through the scaled graph.
            scaler = _calling_grad_scaler(optimizer)
            grads.product_scale = scaler.get_scale() if scaler is not None else None
            if scaler is None:
                grads.product_for = _raising(SCALE_UNKNOWN)

    def _from_loss_fn(self, loss_fn, params, devices, refreshing: bool, amp: AmpScale, cut) -> StepGradients:
        """Usage B: run the forward, compute and write every gradient."""
        scaler = amp.scaler if amp.scaler is not None and amp.scaler.is_enabled() else None
        first: list[tuple[Tensor, Tensor | None]] = []

        def forward() -> Tensor:
            loss, logits = loss_and_logits(loss_fn())
            if not first:
                first.append((loss, logits))
            return scaler.scale(loss) if scaler is not None else loss

        for p in params:
            p.grad = None
        replay = ForwardReplay(forward, devices, self._replay_buffers)
        replay.cut, replay.find_modules = cut, not self._compiled_model
        if is_sharded(params):  # FSDP2: its backward writes the gradients, averaged (sharded.py)
            replay.every_param = params
            with torch.enable_grad():
                replay.first().backward()
            loss, logits = first[0]

            def sharded_product(refresh: list[Tensor]) -> Product:  # unsupported() leaves finite differences
                return FiniteDifferenceHVP(replay, refresh, [p.grad for p in refresh])

            return StepGradients(loss.detach(), logits, sharded_product)
        double = refreshing and self.needs.double_backward
        create_graph = double and self.engine == "autograd"
        keep_graph = create_graph or (refreshing and self.needs.reads_logits)
        with torch.enable_grad(), math_attention() if double else contextlib.nullcontext():
            grads = torch.autograd.grad(
                replay.first(), params, create_graph=create_graph, retain_graph=keep_graph, allow_unused=True
            )
        local = dict(zip(params, grads))  # this process's gradients, with graph when create_graph
        for p, g in local.items():
            if g is not None:
                p.grad = g.detach().clone() if create_graph else g
        # Our own backward bypasses DDP's reducer: average the gradients across processes here.
        distributed.all_reduce_mean_([p.grad for p in params if p.grad is not None])

        def product_for(refresh: list[Tensor]) -> Product:
            if self.engine == "autograd":
                return AutogradHVP([local[p] for p in refresh], refresh)
            # The finite difference pairs the local gradient at θ with the local one at θ + r·v.
            return FiniteDifferenceHVP(replay, refresh, [local[p] for p in refresh])

        loss, logits = first[0]
        return StepGradients(loss.detach(), logits, product_for)

    def _from_closure(self, closure, params, second_order, devices, refreshing: bool, cut) -> StepGradients:
        """A standard closure. Under a DDP ``model`` it runs without the reducer (``no_sync``) and
        the gradients are averaged here, as in usage B; otherwise the gradients are whatever the
        closure's backward produced (averaged by DDP, if the closure's module is one)."""
        ddp = self.model if isinstance(self.model, nn.parallel.DistributedDataParallel) else None
        params = list(params)
        if self.model is not None:
            known = {id(p) for p in params}
            params += [p for p in self.model.parameters() if id(p) not in known]
        # Switching requires_grad off is unsafe under a DDP reducer that expects every gradient and
        # makes a compiled model recompile: then the re-evaluation computes every gradient.
        reducer_in_the_way = distributed.world_size() > 1 and ddp is None
        replay = ClosureReplay(
            closure,
            params,
            devices,
            self._replay_buffers,
            cheap=not reducer_in_the_way and not is_compiled(self.model) and not self._compiled_model,
            sync=ddp.no_sync if ddp is not None else contextlib.nullcontext,
        )
        replay.cut, replay.find_modules = cut, not self._compiled_model
        try:
            with math_attention() if refreshing and self.needs.double_backward else contextlib.nullcontext():
                loss, logits = loss_and_logits(replay.first())
        except RuntimeError as error:
            if reducer_in_the_way and "leaf Variable that requires grad" in str(error):
                raise RuntimeError(DDP_DOUBLE_BACKWARD) from None
            raise
        local = {p: p.grad for p in second_order if p.grad is not None}  # this process's, graph included
        if ddp is not None:
            local = {p: g if g.requires_grad else g.clone() for p, g in local.items()}
            for p in params:
                if p.grad is not None and p.grad.requires_grad:
                    p.grad = p.grad.detach().clone()
            distributed.all_reduce_mean_([p.grad for p in params if p.grad is not None])

        def product_for(refresh: list[Tensor]) -> Product:
            if self.engine == "autograd":
                if not any(local[p].requires_grad for p in refresh):
                    raise RuntimeError(MISSING_GRAPH)
                return AutogradHVP([local[p] for p in refresh], refresh)
            return FiniteDifferenceHVP(replay, refresh, [local[p] for p in refresh])

        return StepGradients(loss, logits, product_for)

    def _from_backward_graph(self, params: list[Tensor]) -> Callable[[list[Tensor]], Product]:
        """Usage A: products through the graph that ``backward(create_graph=True)`` left in ``.grad``."""

        def product_for(refresh: list[Tensor]) -> Product:
            if self.engine != "autograd":
                raise RuntimeError(NEEDS_CLOSURE)
            if not any(p.grad.requires_grad for p in params if p.grad is not None):
                raise RuntimeError(MISSING_GRAPH)
            return AutogradHVP([p.grad for p in refresh], refresh)

        return product_for

    def _replay_buffers(self) -> list[Tensor]:
        return list(self.model.buffers()) if self.model is not None else []

    # ------------------------------------------------------------------------- estimate

    def estimate(
        self,
        grads: StepGradients,
        refresh: list[Tensor],
        generator: torch.Generator | None,
        blocks: list[bool] | None = None,
    ) -> dict[Tensor, Tensor]:
        """The estimate for each tensor of ``refresh``, averaged across processes; {} when it is not
        finite (e.g. an fp16 overflow: the optimizer keeps its previous estimate). ``blocks[i]``: the
        tensor's whole Gauss-Newton-Bartlett block (``[n, n]``) instead of its diagonal (``gnb`` only):
        ``(1/B)·Σⱼ uⱼuⱼᵀ`` from ``block_chunks`` chunks of rows (:func:`bartlett_rows`), averaged across
        processes after the products, so it stays unbiased; the other tensors then get the diagonal of
        the same estimate."""
        if self.needs.reads_logits and grads.logits is None:
            raise RuntimeError(NEEDS_LOGITS)
        if blocks is not None and any(blocks) and self.estimator != "gnb":
            raise ValueError("block estimates come from estimator='gnb'")
        try:
            with torch.enable_grad():
                if blocks is not None and any(blocks):
                    if self.gnb_fraction is not None:
                        rows = self._sub_batch.sampled(refresh, self.gnb_fraction, generator, self.block_chunks)
                    else:
                        rows = bartlett_rows(grads.logits, refresh, self.block_chunks, generator)
                    h = bartlett_row_curvature(*rows, blocks)
                    # FSDP2: the rows came whole; the diagonals go back to shards like their parameters
                    h = [x if block else local_like(x, p) for x, p, block in zip(h, refresh, blocks)]
                elif self.gnb_fraction is not None:
                    h = bartlett_curvature(*self._sub_batch.sampled(refresh, self.gnb_fraction, generator))
                elif self.estimator == "gnb":
                    h = bartlett_curvature(*bartlett_gradients(grads.logits, refresh, generator))
                else:
                    engine = (
                        GGNVectorProduct(grads.logits, refresh)
                        if self.engine == "gauss_newton"
                        else grads.product_for(refresh)
                    )
                    h = estimate(self.estimator, engine, refresh, range(len(refresh)), generator)
        except RuntimeError as error:
            raise _clearer(error) from None
        h = [x.detach() if x.requires_grad else x for x in h]  # a detach is a dispatch per tensor
        # Products through a graph of the scaled loss are scaled; the logits-based estimates are not.
        scale = grads.product_scale
        if scale is not None and not (self.needs.reads_logits or self.estimator == "gnb"):
            torch._foreach_div_(h, scale() if callable(scale) else scale)
        if not is_sharded(refresh):  # under FSDP2 the estimates are of the global batch already
            distributed.all_reduce_mean_(h)  # every replica gets the same estimate
        if not all_finite(h):
            return {}
        return dict(zip(refresh, h))

    def block_product(self, grads: StepGradients, params: list[Tensor]) -> Callable[[int, Tensor], Tensor]:
        """``product(k, v) = G_kk v``: exact GGN-vector products of the step's batch restricted to
        ``params[k]``'s own block, averaged across processes (every rank then runs the same CG)."""
        if grads.logits is None:
            raise RuntimeError(NEEDS_LOGITS)
        try:
            with torch.enable_grad():
                engine = GGNVectorProduct(grads.logits, params)
        except RuntimeError as error:
            raise _clearer(error) from None

        def product(k: int, v: Tensor) -> Tensor:
            with torch.enable_grad():
                (gv,) = engine({k: v}, [k])
            distributed.all_reduce_mean_([gv])
            return gv

        return product


# ----------------------------------------------------------------------------- helpers


def loss_and_logits(value: Any) -> tuple[Tensor, Tensor | None]:
    """A closure or loss function returns the loss, or ``(loss, logits)`` for the estimates that read
    the logits."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise TypeError(f"the closure / loss_fn returned {len(value)} values; return loss or (loss, logits)")
        return value[0], value[1]
    return value, None


def all_finite(tensors: list[Tensor]) -> bool:
    """One host synchronisation for the whole list; callers use it where the answer decides what runs.
    Per device, one ``cat`` and one check (not a check per tensor: launches count on a GPU)."""
    if not tensors:
        return True
    sharded = is_sharded(tensors)
    if sharded:  # FSDP2: each process checks its shards, and all agree (a refresh's collectives follow)
        tensors = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    devices: dict[torch.device, list[Tensor]] = {}
    for t in tensors:
        devices.setdefault(t.device, []).append(t if t.ndim == 1 else t.reshape(-1))  # a reshape is a dispatch
    checks = [torch.isfinite(torch.cat(flat)).all() for flat in devices.values()]
    finite = bool(torch.stack([c.to(checks[0].device) for c in checks]).all())
    return distributed.all_true(finite, tensors[0].device) if sharded else finite


def is_compiled(model: nn.Module | None) -> bool:
    if model is None:
        return False
    compiled = getattr(torch._dynamo.eval_frame, "OptimizedModule", ())
    return any(isinstance(m, compiled) for m in (model, getattr(model, "module", None)))


def _clearer(error: RuntimeError) -> RuntimeError:
    """The one-line error for what went wrong in a product, or the error itself."""
    if "backward through the graph a second time" in str(error):
        return RuntimeError(GRAPH_FREED)
    return no_double_backward_error(error) or error


def _raising(message: str) -> Callable[[list[Tensor]], Product]:
    def product_for(refresh: list[Tensor]) -> Product:
        raise RuntimeError(message)

    return product_for


def _calling_grad_scaler(optimizer: torch.optim.Optimizer) -> torch.amp.GradScaler | None:
    """The GradScaler whose ``step`` is calling ``optimizer.step``.

    torch's protocol hands the optimizer ``grad_scale=None`` once the caller has unscaled the gradients
    (``scaler.unscale_`` before ``scaler.step``, to clip: timm's NativeScaler does this), so nothing in
    the protocol says by how much the caller's backward graph is scaled -- and a Hessian-vector product
    through that graph is scaled by it. The one object that knows is the GradScaler running the step,
    a few frames up. This is the only place the project reaches past torch's protocol; where the
    scaler is not found, the estimate stops with a one-line error (``SCALE_UNKNOWN``) rather than
    being off by the scale."""
    frame = sys._getframe(1)
    for _ in range(8):
        frame = frame.f_back
        if frame is None:
            return None
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, torch.amp.GradScaler) and id(optimizer) in candidate._per_optimizer_states:
            return candidate
    return None
