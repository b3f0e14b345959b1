"""SGD with Partial Hessian (SGD-PH), in the style of ``torch/optim/sgd.py``: the :class:`SGDPH` class
gathers gradients, curvature estimates and state, and calls the functional :func:`sgdph`."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable
from typing import Any, cast

import torch
import torch.nn as nn
from torch import Tensor
from torch.optim import Optimizer
from torch.optim.optimizer import _default_to_fused_or_foreach
from torch.optim.sgd import sgd as sgd_functional

from .. import checks, distributed
from ..activation_reuse import ActivationReuse, ReuseForTarget
from ..gauss_newton import GGNVectorProduct, SubBatchGNB, gauss_newton_bartlett
from ..hessian import (
    ENGINES,
    ESTIMATORS,
    HVP,
    AutogradHVP,
    ClosureReplay,
    FiniteDifferenceHVP,
    ForwardReplay,
    _cuda_indices,
    check_choice,
    estimate,
    math_attention,
    no_double_backward_error,
)
from .param_groups import second_order_groups

__all__ = ["SGDPH", "sgdph"]

#: What the optimizer offers on top of :func:`~sgdph_tools.partial_hessian`'s HVP-based choices: the
#: Gauss-Newton-Bartlett estimate of the GGN diagonal, and exact GGN-vector products as an engine
#: (:mod:`sgdph_tools.gauss_newton`). Both read the logits.
OPTIMIZER_ESTIMATORS = (*ESTIMATORS, "gnb")
OPTIMIZER_ENGINES = (*ENGINES, "gauss_newton")
#: How the curvature EMA turns into a step (``rule=``; the class docstring gives the formulas).
RULES = ("paper", "damped", "normalized")
#: The rule when none is given: ``normalized``, chosen by the study in docs/evidence.md (it ties SGDM
#: with BatchNorm and beats it without; the paper's rule lost on both nets and diverged on one seed).
#: ``authors_code=True`` implies the paper's rule.
DEFAULT_RULE = "normalized"
#: ε when none is given: the paper's for its rule; for ``normalized`` ε is relative to the tensor's mean
#: curvature (0.3: r between 0 and 4.3), the value the study chose on validation in all four of its
#: ``normalized`` contenders (grid 0.3, 1); for ``damped`` it is an absolute curvature with no
#: scale-free value -- 0.3 is where the weight-norm study saw SGD-PH train as well as SGDM.
DEFAULT_EPS = {"paper": 1e-4, "damped": 0.3, "normalized": 0.3}

#: Settings that hold for the whole optimizer (one engine per step; Hutchinson probes every tensor
#: at once). They sit in every param group, so they travel with ``state_dict()``; all groups agree.
OPTIMIZER_WIDE = ("estimator", "engine", "hessian_every", "gnb_fraction", "authors_code", "seed")

_MISSING_GRAPH = (
    "SGDPH needs the gradient graph of the second-order parameters to estimate their Hessian: call "
    "loss.backward(create_graph=optimizer.is_second_order) before optimizer.step() (or in the closure), "
    "or let the optimizer run the backward itself with optimizer.step(loss_fn=fn)"
)
_NEEDS_CLOSURE = (
    "engine='finite_difference' re-evaluates the loss at a perturbed point: call optimizer.step(closure) "
    "with a standard closure (zero the grads, forward, loss.backward(), return the loss), or "
    "optimizer.step(loss_fn=fn), fn() returning the loss without calling backward"
)
_NEEDS_LOGITS = (
    "estimator='gnb' and engine='gauss_newton' read the logits: return (loss, logits) from the closure or "
    "from loss_fn, e.g. optimizer.step(loss_fn=lambda: (criterion(logits := model(x), y), logits))"
)
_GRAPH_FREED = (
    "the logits' graph was freed by the closure's backward: call loss.backward(create_graph="
    "optimizer.is_second_order) in the closure (it keeps the graph), or use optimizer.step(loss_fn=...)"
)
_DDP_DOUBLE_BACKWARD = (
    "DistributedDataParallel cannot run backward(create_graph=True): pass model=<the DDP module> to SGDPH "
    "(the optimizer then runs the closure under no_sync() and averages the gradients itself), or call "
    "optimizer.step(loss_fn=fn), or use engine='finite_difference'"
)


class SGDPH(Optimizer):
    r"""SGD with momentum, plus a Newton-type step for channel-wise 1-D parameters.

    .. code-block:: text

        input: lr (γ), momentum (β), weight_decay (λ), so_lr (τ), hessian_momentum (α), eps (ε),
               second-order flag per param group, estimator, hessian_every (k)
        for t = 1, 2, ...:
            g ← ∇L(θ)
            first-order params:  exactly torch.optim.SGD(lr=γ, momentum=β, weight_decay=λ):
                buf ← β·buf + (g + λθ);  θ ← θ - γ·buf                 (coupled weight decay)
            second-order params (buf holds gradients only):
                buf ← g  (first step)       buf ← β·buf + g               (no dampening)
                if (t - 1) mod k = 0 and the param is refreshed at this step:
                    h ← estimator's H-estimate at the current θ, before the update
                    D ← α·D + (1 - α)·|h|;   n ← n + 1                 (D = 0, n = 0 initially)
                D̂ = D / (1 - αⁿ)                                       (bias-corrected)
                if n = 0:  θ ← θ - γ·(buf + λθ)
                else:      θ ← θ - γ·(r ⊙ buf + λθ),   r by the rule:
                    paper:       r = τ / (D̂ + ε)                       (Algorithm 1)
                    damped:      r = 1 / (1 + D̂ / ε)                   (SGD's step, shrunk where D̂ ≳ ε)
                    normalized:  r = (1 + ε) / (D̂ / mean(D̂) + ε)       (mean over the tensor)

    The rules differ in how they fail. ``paper``'s step relative to SGD's, ``r``, depends on the
    curvature's absolute scale: where D̂ grows (weight-norm gammas: ~1000x during training) it
    shrinks towards 0 and the tensor stops learning; where D̂ ≈ 0 it is τ/ε (10x SGD's with the
    defaults). ``damped`` never exceeds SGD's step (τ is not used; ε is the curvature at which the
    step halves). ``normalized`` divides each tensor's curvature by its mean, so only the relative
    curvature within a tensor shapes the step: r = 1 at the tensor's mean curvature, at most
    (1 + ε)/ε where D̂ = 0 (4.3x SGD's at the default ε = 0.3), whatever the curvature's scale (τ
    is not used). ``docs/evidence.md`` measures them against each other; ``normalized`` is the
    default since that study (the paper's rule: ``rule="paper"``).

    Refresh schedule: ``rowsum`` (and ``diagonal``) refresh ONE second-order tensor per refreshing
    step, round robin in parameter order (the tensor with the fewest refreshes so far, first in
    order: frozen or unused tensors are skipped without breaking the cycle); ``hutchinson``
    refreshes all of them with one HVP. A step is refreshing when ``(t - 1) % hessian_every == 0``.

    ``authors_code=True`` follows the authors' released ``sgdph.py`` instead, step for step: the
    second-order parameters are the 1-D ones by ``ndim`` (the last one takes an SGD step), the round
    robin has period M = the number of 1-D parameters (the step that would refresh the last one
    refreshes nothing), the Hessian EMA uses the momentum β, and ε sits inside their approximate bias
    correction: ``θ ← θ - γ·(τ·buf·c / (D + ε) + λθ)`` with ``c = 1 - β^(⌊t/M⌋+1)``, also before the
    first refresh. ``docs/algorithm.md`` lists every difference and what it changes.

    Which params are second-order is decided in one place, :mod:`sgdph_tools.optim.param_groups`:
    each param group carries ``second_order``; groups without it (plain parameters, timm's
    weight-decay groups) are split by the authors' rule, 1-D params except the last one.

    Args:
        params: parameters or param groups (a group may set ``second_order`` and any per-group
            hyperparameter: lr, momentum, weight_decay, so_lr, hessian_momentum, eps, foreach).
        lr: learning rate γ (default 0.1, the authors' default; the paper used 0.01 on CIFAR).
        momentum: momentum β of the gradient buffer (default 0.9).
        weight_decay: λ, coupled for first-order params, added after preconditioning for
            second-order params (default 0).
        so_lr: second-order learning rate τ (default 1e-3).
        hessian_momentum: α of the Hessian EMA (default 0.9; ``authors_code`` uses β).
        eps: ε of the rule; default per rule (``DEFAULT_EPS``): ``paper`` 1e-4 (the paper's),
            ``damped`` 0.3, ``normalized`` 0.3 -- each rule reads ε in its own units (above).
        rule: ``"normalized"`` (default; ``docs/evidence.md``), ``"paper"`` (Algorithm 1) or
            ``"damped"``: how the curvature EMA scales the step (above). Per group.
            ``authors_code`` implies and needs ``"paper"``.
        estimator: ``"rowsum"`` (default here: it needs no model; the paper's ``H_kk·1``; recipes
            default to ``"gnb"`` with ``gnb_fraction=0.25``, ``docs/evidence.md``), ``"hutchinson"``
            (``z ⊙ Hz``, unbiased for the true diagonal), ``"diagonal"`` (exact; one HVP per element: diagnostics) or
            ``"gnb"`` (Gauss-Newton-Bartlett: ``B·ĝ⊙ĝ`` for labels sampled from the model,
            unbiased for the GGN diagonal, non-negative, one extra backward; reads the logits, or
            runs its own forward on a sub-batch with ``gnb_fraction``).
        engine: what the products are: ``"autograd"`` (Hessian, double backward),
            ``"finite_difference"`` (Hessian, one extra forward and a 1-D-only backward, no
            ``create_graph``; needs a closure or ``loss_fn``; with ``model`` and one tensor per
            refresh -- rowsum, diagonal -- that forward reuses the activations below the tensor's
            layer: attribute ``reuse_activations``) or ``"gauss_newton"`` (exact
            GGN-vector products, positive semi-definite; reads the logits). ``gnb`` needs none.
        hessian_every: refresh the Hessian every k steps (default 1).
        gnb_fraction: with ``estimator="gnb"``: estimate from the model's own forward on this
            leading fraction of the step's batch (``model`` required: its inputs are recorded by a
            forward hook) instead of from the step's logits; the step's backward then keeps no
            graph, and no logits need be returned. Default None (the step's logits).
        authors_code: reproduce the authors' update rule (see above).
        seed: seed of the Hutchinson probes; the probes of step t on rank r are a function of
            (seed, r, t) alone, so there is no generator state to save.
        foreach: use the multi-tensor (``torch._foreach_*``) update; default: on CUDA, as torch.
        model: the module the closure or loss function runs (optional). Give it when that module is
            wrapped in ``DistributedDataParallel`` (the optimizer then runs closures under
            ``no_sync()`` and averages gradients itself, which is what lets the autograd engine work
            under DDP) or compiled with ``torch.compile`` (compiled modules hide their buffers from
            the global hook that restores BatchNorm statistics after an extra forward).

    ``estimator``, ``engine``, ``hessian_every``, ``authors_code`` and ``seed`` are optimizer-wide:
    they are stored in every param group, so ``state_dict()`` carries them, and on
    ``load_state_dict`` the checkpoint's values win (with a warning when they differ).

    Usage (``docs/algorithm.md`` says which to use when)::

        # A, a standard loop (timm's train.py): create_graph for the autograd engine
        loss = criterion(model(x), y)
        loss.backward(create_graph=optimizer.is_second_order)
        optimizer.step()

        # a closure, as torch.optim.LBFGS takes one: every engine
        def closure():
            optimizer.zero_grad()
            loss = criterion(model(x), y)
            loss.backward(create_graph=optimizer.is_second_order)
            return loss
        optimizer.step(closure)

        # B, the optimizer runs every backward itself (fn: forward only, no backward): every
        # engine, DDP without model=, AMP and clipping inside the step
        optimizer.step(loss_fn=lambda: criterion(model(x), y))

    ``gnb`` and ``gauss_newton`` read the logits: the closure or ``loss_fn`` returns
    ``(loss, logits)`` instead of the loss (any estimator accepts that form).

    With AMP, ``scaler.step(optimizer)`` works as with any optimizer (GradScaler hands itself to
    ``step``; the HVP of a scaled loss is divided by the scale); in usage B pass
    ``step(loss_fn=fn, grad_scaler=scaler)``. Then ``scaler.update()``.
    """

    _step_supports_amp_scaling = True  # GradScaler.step passes itself: the HVP needs its scale

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        so_lr: float = 1e-3,
        hessian_momentum: float = 0.9,
        eps: float | None = None,
        estimator: str = "rowsum",
        engine: str = "autograd",
        hessian_every: int = 1,
        gnb_fraction: float | None = None,
        authors_code: bool = False,
        rule: str | None = None,
        seed: int = 0,
        foreach: bool | None = None,
        model: nn.Module | None = None,
    ):
        if isinstance(params, Tensor):
            raise TypeError("params must be an iterable of tensors or param-group dicts, not one tensor: pass [tensor]")
        for name, value in (
            ("lr", lr),
            ("momentum", momentum),
            ("weight_decay", weight_decay),
            ("so_lr", so_lr),
            ("hessian_momentum", hessian_momentum),
            *([("eps", eps)] if eps is not None else []),
        ):
            checks.number(name, value)
        for name, value in (("lr", lr), ("momentum", momentum), ("weight_decay", weight_decay), ("so_lr", so_lr)):
            if not value >= 0.0:
                raise ValueError(f"invalid {name}: {value} (must be >= 0)")
        if not 0.0 <= hessian_momentum < 1.0:
            raise ValueError(f"invalid hessian_momentum: {hessian_momentum} (must be in [0, 1))")
        if rule is None:
            rule = "paper" if authors_code else DEFAULT_RULE
        check_choice("rule", rule, RULES)
        if eps is None:
            eps = DEFAULT_EPS[rule]
        if not eps > 0.0:
            raise ValueError(f"invalid eps: {eps} (must be > 0)")
        if not (isinstance(hessian_every, int) and hessian_every >= 1):
            raise ValueError(f"invalid hessian_every: {hessian_every} (must be an integer >= 1)")
        check_choice("estimator", estimator, OPTIMIZER_ESTIMATORS)
        check_choice("engine", engine, OPTIMIZER_ENGINES)
        if authors_code and rule != "paper":
            raise ValueError(f"authors_code=True is the authors' rule: rule='paper' (got rule={rule!r})")
        if authors_code:
            if estimator != "rowsum" or hessian_every != 1:
                raise ValueError("authors_code=True is the authors' rule: estimator='rowsum', hessian_every=1")
            if not 0.0 < momentum < 1.0:
                raise ValueError("authors_code=True needs 0 < momentum < 1 (their Hessian EMA uses it)")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module (the one the closure runs), got {type(model).__name__}")
        if gnb_fraction is not None:
            if not (isinstance(gnb_fraction, (int, float)) and 0.0 < gnb_fraction <= 1.0):
                raise ValueError(f"invalid gnb_fraction: {gnb_fraction} (must be in (0, 1], or None)")
            if estimator != "gnb":
                raise ValueError(f"gnb_fraction applies to estimator='gnb' only (got estimator={estimator!r})")
            if model is None:
                raise ValueError(
                    "gnb_fraction needs model=<the module the loss runs>: the sub-batch is taken from "
                    "its recorded inputs"
                )
        self.model = model
        #: finite differences along one tensor reuse the activations below it (needs ``model``; exact:
        #: sgdph_tools/activation_reuse.py); False: every perturbed forward runs in full
        self.reuse_activations = True
        self._activation_reuse: ActivationReuse | None = None
        # Records the model's inputs while the optimizer estimates GNB from a sub-batch (a hook is
        # registered whenever a model is given: a loaded checkpoint may switch gnb_fraction on).
        self._sub_batch = (
            SubBatchGNB(model, list(model.buffers()), recording=lambda: self._gnb_fraction is not None)
            if model is not None
            else None
        )
        defaults = dict(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            so_lr=so_lr,
            hessian_momentum=hessian_momentum,
            eps=eps,
            foreach=foreach,
            estimator=estimator,
            engine=engine,
            hessian_every=hessian_every,
            gnb_fraction=gnb_fraction,
            authors_code=bool(authors_code),
            rule=rule,
            seed=seed,
        )
        super().__init__(second_order_groups(params, authors_code=authors_code), defaults)

    # ------------------------------------------------------------------------- settings

    @property
    def estimator(self) -> str:
        return self.param_groups[0]["estimator"]

    @property
    def engine(self) -> str:
        return self.param_groups[0]["engine"]

    @property
    def hessian_every(self) -> int:
        return self.param_groups[0]["hessian_every"]

    @property
    def _gnb_fraction(self) -> float | None:
        return self.param_groups[0]["gnb_fraction"] if self.estimator == "gnb" else None

    @property
    def authors_code(self) -> bool:
        return self.param_groups[0]["authors_code"]

    @property
    def is_second_order(self) -> bool:
        """timm's convention: True when the caller's backward must keep the graph (``create_graph``):
        for the double backward of the autograd engine, and for the estimates that read the logits
        (``gnb``, ``gauss_newton``) after the backward. The finite-difference engine and ``gnb`` with
        ``gnb_fraction`` (its own forward) need none."""
        if self.estimator == "gnb":
            return self._gnb_fraction is None
        return self.engine != "finite_difference"

    @property
    def _reads_logits(self) -> bool:
        if self.estimator == "gnb":
            return self._gnb_fraction is None
        return self.engine == "gauss_newton"

    @property
    def _double_backward(self) -> bool:
        """The Hessian pass differentiates the backward (autograd HVPs, or the double-vjp of GGN products)."""
        return self.estimator != "gnb" and self.engine in ("autograd", "gauss_newton")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key in OPTIMIZER_WIDE:
            if key in param_group and param_group[key] != self.defaults[key]:
                raise ValueError(
                    f"{key} is optimizer-wide: a param group cannot set {key}={param_group[key]!r} "
                    f"(the optimizer's is {self.defaults[key]!r})"
                )
        if "rule" in param_group:  # a group with its own rule gets that rule's ε unless it sets one
            check_choice("rule", param_group["rule"], RULES)
            if param_group["rule"] != "paper" and self.defaults["authors_code"]:
                raise ValueError("authors_code=True is the authors' rule: a param group cannot set another rule")
            param_group.setdefault("eps", DEFAULT_EPS[param_group["rule"]])
        groups = [param_group] if "second_order" in param_group else second_order_groups([param_group])
        for group in groups:
            super().add_param_group(group)
            self._init_state(group)

    def _init_state(self, group: dict[str, Any]) -> None:
        """Create the state eagerly, as a step would: torch.distributed.checkpoint builds its load
        template from a fresh optimizer's state (and would otherwise call ``step()`` with zero
        gradients and no graph to create it). A zero momentum buffer gives exactly the lazy one's
        first value, β·0 + g = g."""
        for p in group["params"]:
            if group["momentum"] != 0 and p.requires_grad and "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["second_order"]:
                self._second_order_state(p)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, plus: the checkpoint's optimizer-wide settings replace the constructor's (with a
        warning naming them), and checkpoints of sgdph-tools 0.1 (an ``"sgdph"`` state entry) load."""
        constructed = {k: self.defaults[k] for k in OPTIMIZER_WIDE}
        super().load_state_dict(_upgrade_state_dict(state_dict))
        for group in self.param_groups:
            for key, value in constructed.items():
                group.setdefault(key, value)
        loaded = {k: self.param_groups[0][k] for k in OPTIMIZER_WIDE}
        if any(g[k] != loaded[k] for g in self.param_groups for k in OPTIMIZER_WIDE):
            raise ValueError(
                f"the state dict's param groups disagree on an optimizer-wide setting ({', '.join(OPTIMIZER_WIDE)})"
            )
        changed = [f"{k}={loaded[k]!r} (was {v!r})" for k, v in constructed.items() if loaded[k] != v]
        if changed:
            warnings.warn(
                f"SGDPH.load_state_dict: the checkpoint's settings replace the constructor's: {', '.join(changed)}",
                stacklevel=2,
            )
        self.defaults.update(loaded)

    def _second_order_state(self, p: Tensor) -> dict[str, Any]:
        state = self.state[p]
        if "step" not in state:
            state["step"] = torch.tensor(0.0)  # as torch's Adam: a CPU scalar tensor per parameter
        if "hessian_ema" not in state:
            state["hessian_ema"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["hessian_refreshes"] = 0
        return state

    def _steps_taken(self) -> int:
        """The optimizer's step count: the largest per-parameter count of the second-order params."""
        steps = [
            self.state[p]["step"]
            for g in self.param_groups
            if g["second_order"]
            for p in g["params"]
            if "step" in self.state.get(p, {})
        ]
        return int(max(float(s) for s in steps)) if steps else 0

    # ------------------------------------------------------------------------- step

    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        loss_fn: Callable[[], Tensor] | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        max_grad_norm: float | None = None,
    ) -> Tensor | None:
        """One optimization step. See the class docstring for the three usages.

        ``max_grad_norm`` (closure or ``loss_fn``): clip the total gradient norm after the
        gradients are computed, averaged across processes and unscaled -- a caller cannot, since
        they appear inside ``step``. The Hessian estimate is not clipped.
        """
        if closure is not None and loss_fn is not None:
            raise ValueError("pass either a closure (which calls backward) or loss_fn (which does not), not both")
        step = self._steps_taken() + 1
        second_order = [p for g in self.param_groups if g["second_order"] for p in g["params"] if p.requires_grad]
        refreshing = bool(second_order) and (step - 1) % self.hessian_every == 0
        scaled = grad_scaler is not None and grad_scaler.is_enabled()

        loss = logits = None
        uses_replay = closure is not None or loss_fn is not None
        cut = self._activations_to_reuse(step, second_order) if refreshing and uses_replay else None
        if loss_fn is not None:
            loss, logits, hvp_for = self._gradients_from_loss_fn(
                loss_fn, refreshing, grad_scaler if scaled else None, cut
            )
        elif closure is not None:
            loss, logits, hvp_for = self._gradients_from_closure(closure, refreshing, cut)
        else:
            if max_grad_norm is not None:
                raise ValueError(
                    "max_grad_norm needs a closure or loss_fn; without them clip .grad yourself before step()"
                )
            hvp_for = self._hvp_from_backward_graph
        with_grad = [p for g in self.param_groups for p in g["params"] if p.grad is not None]
        if scaled:
            try:
                grad_scaler.unscale_(self)  # records found_inf for scaler.update()
            except RuntimeError as error:  # the caller unscaled already (e.g. to clip): fine
                if "already been called" not in str(error):
                    raise
            if not _all_finite([p.grad for p in with_grad]):
                if loss_fn is None:
                    self._free_graph()
                return loss  # skipped, like GradScaler.step: no state changes
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(with_grad, max_grad_norm)

        hessians: dict[Tensor, Tensor] = {}
        if refreshing:
            refresh = self._choose_refresh(step, [p for p in second_order if p.grad is not None])
            if refresh:
                hessians = self._estimate(refresh, hvp_for, logits, step, grad_scaler.get_scale() if scaled else 1.0)

        with torch.no_grad():
            for group in self.param_groups:
                self._update_group(group, hessians, step)
        if loss_fn is None:  # loss_fn's gradients are detached already; a caller's backward may hold a graph
            self._free_graph()
        return loss

    def _free_graph(self) -> None:
        """Detach ``.grad``: a gradient built with ``create_graph`` keeps the double-backward graph
        alive through the parameter <-> gradient cycle."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.requires_grad:
                    p.grad = p.grad.detach()

    # ------------------------------------------------------------------------- gradients and HVPs

    def _replay_buffers(self) -> list[Tensor]:
        return list(self.model.buffers()) if self.model is not None else []

    def _devices(self) -> set[torch.device]:
        return {p.device for g in self.param_groups for p in g["params"]}

    def _activations_to_reuse(self, step: int, second_order: list[Tensor]) -> ReuseForTarget | None:
        """For a finite difference along one tensor: the record of the activations below it, which the
        perturbed forward reuses (:mod:`sgdph_tools.activation_reuse`); None where that does not apply."""
        if not (
            self.reuse_activations
            and self.engine == "finite_difference"
            and self.estimator in ("rowsum", "diagonal")
            and not self.authors_code
            and self.model is not None
            and not isinstance(self.model, nn.parallel.DistributedDataParallel)
            and not _is_compiled(self.model)
        ):
            return None
        if self._activation_reuse is None:
            self._activation_reuse = ActivationReuse(self.model, _cuda_indices(self._devices()))
        predicted = self._choose_refresh(step, second_order)  # the choice after the forward, unless a grad is missing
        return self._activation_reuse.for_target(predicted[0]) if predicted else None

    def _gradients_from_loss_fn(self, loss_fn, refreshing: bool, grad_scaler, cut: ReuseForTarget | None = None):
        """Usage B: run the forward, compute and write every gradient, and return the loss and a
        function that builds the HVP engine for the tensors chosen for refresh."""
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        first: list[tuple[Tensor, Tensor | None]] = []

        def forward() -> Tensor:
            loss, logits = _loss_and_logits(loss_fn())
            if not first:
                first.append((loss, logits))
            return grad_scaler.scale(loss) if grad_scaler is not None else loss

        self.zero_grad(set_to_none=True)
        replay = ForwardReplay(forward, self._devices(), self._replay_buffers)
        replay.cut = cut
        create_graph = refreshing and self._double_backward and self.engine == "autograd"
        keep_graph = create_graph or (refreshing and self._reads_logits)
        with (
            torch.enable_grad(),
            math_attention() if refreshing and self._double_backward else contextlib.nullcontext(),
        ):
            grads = torch.autograd.grad(
                replay.first(), params, create_graph=create_graph, retain_graph=keep_graph, allow_unused=True
            )
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

        loss, logits = first[0]
        return loss.detach(), logits, hvp_for

    def _gradients_from_closure(self, closure, refreshing: bool, cut: ReuseForTarget | None = None):
        """A standard closure. Under a DDP ``model`` it runs without the reducer (``no_sync``) and
        the gradients are averaged here, as in usage B; otherwise the gradients are whatever the
        closure's backward produced (averaged by DDP, if the closure's module is one)."""
        ddp = self.model if isinstance(self.model, nn.parallel.DistributedDataParallel) else None
        params = [p for g in self.param_groups for p in g["params"]]
        if self.model is not None:
            known = {id(p) for p in params}
            params += [p for p in self.model.parameters() if id(p) not in known]
        # Switching requires_grad off is unsafe under a DDP reducer that expects every gradient and
        # makes a compiled model recompile: then the re-evaluation computes every gradient.
        reducer_in_the_way = distributed.world_size() > 1 and ddp is None
        cheap = not reducer_in_the_way and not _is_compiled(self.model)
        replay = ClosureReplay(
            closure,
            params,
            self._devices(),
            self._replay_buffers,
            cheap=cheap,
            sync=ddp.no_sync if ddp is not None else contextlib.nullcontext,
        )
        replay.cut = cut
        try:
            with math_attention() if refreshing and self._double_backward else contextlib.nullcontext():
                loss, logits = _loss_and_logits(replay.first())
        except RuntimeError as error:
            if reducer_in_the_way and "leaf Variable that requires grad" in str(error):
                raise RuntimeError(_DDP_DOUBLE_BACKWARD) from None
            raise
        second_order = [p for g in self.param_groups if g["second_order"] for p in g["params"]]
        local = {p: p.grad for p in second_order if p.grad is not None}  # this process's, graph included
        if ddp is not None:
            local = {p: g if g.requires_grad else g.clone() for p, g in local.items()}
            for p in params:
                if p.grad is not None and p.grad.requires_grad:
                    p.grad = p.grad.detach().clone()
            distributed.all_reduce_mean_([p.grad for p in params if p.grad is not None])

        def hvp_for(refresh: list[Tensor]) -> HVP:
            if self.engine == "autograd":
                if not any(local[p].requires_grad for p in refresh):
                    raise RuntimeError(_MISSING_GRAPH)
                return AutogradHVP([local[p] for p in refresh], refresh)
            return FiniteDifferenceHVP(replay, refresh, [local[p] for p in refresh])

        return loss, logits, hvp_for

    def _hvp_from_backward_graph(self, refresh: list[Tensor]) -> HVP:
        """Usage A: HVPs through the graph that ``backward(create_graph=True)`` left in ``.grad``."""
        if self.engine != "autograd":
            raise RuntimeError(_NEEDS_CLOSURE)
        if not any(p.grad.requires_grad for g in self.param_groups for p in g["params"] if p.grad is not None):
            raise RuntimeError(_MISSING_GRAPH)
        return AutogradHVP([p.grad for p in refresh], refresh)

    def _choose_refresh(self, step: int, candidates: list[Tensor]) -> list[Tensor]:
        if not candidates:
            return []
        if self.authors_code:
            # The authors' round robin: the ((t - 1) mod M + 1)-th 1-D parameter that has a gradient,
            # M counting every 1-D parameter. The last 1-D parameter takes an SGD step: its HVP,
            # which their code computes and discards, is skipped here.
            one_d = self._one_d_params()
            with_grad = [p for p in one_d if p.grad is not None]
            k = (step - 1) % len(one_d)
            chosen = with_grad[k] if k < len(with_grad) else None
            return [chosen] if chosen is not None and any(chosen is c for c in candidates) else []
        if self.estimator in ("hutchinson", "gnb"):
            return candidates
        # Round robin, derived from the refresh counts: the fewest refreshes, first in order.
        counts = [self.state[p].get("hessian_refreshes", 0) for p in candidates]
        return [candidates[counts.index(min(counts))]]

    def _one_d_params(self) -> list[Tensor]:
        """Every 1-D parameter in order: the authors' round robin and its period M."""
        return [p for g in self.param_groups for p in g["params"] if p.ndim == 1]

    def _probe_generator(self, step: int) -> torch.Generator | None:
        """Hutchinson's probes at step t on rank r come from a generator seeded with (seed, r, t):
        replicas draw independent probes (the all-reduce averages them), a resumed run draws the
        same ones, and no per-rank generator state has to survive a checkpoint (torch's distributed
        checkpoint keeps one copy of tensors that are not sharded)."""
        if self.estimator not in ("hutchinson", "gnb"):
            return None
        mixed = (self.param_groups[0]["seed"] * 1_000_003 + distributed.rank()) * 1_000_000_007 + step
        return torch.Generator().manual_seed(mixed % (2**63 - 1))

    def _estimate(
        self,
        refresh: list[Tensor],
        hvp_for: Callable[[list[Tensor]], HVP],
        logits: Tensor | None,
        step: int,
        scale: float,
    ) -> dict[Tensor, Tensor]:
        if self._reads_logits and logits is None:
            raise RuntimeError(_NEEDS_LOGITS)
        if self._reads_logits or self.estimator == "gnb":
            scale = 1.0  # computed from logits, not from the (scaled) loss
        generator = self._probe_generator(step)
        try:
            with torch.enable_grad():
                if self._gnb_fraction is not None:
                    if self._sub_batch is None:
                        raise RuntimeError(
                            "gnb_fraction needs the optimizer built with model=<the module the loss runs>"
                        )
                    h = self._sub_batch.estimate(refresh, self._gnb_fraction, generator)
                elif self.estimator == "gnb":
                    h = gauss_newton_bartlett(logits, refresh, generator)
                else:
                    engine = GGNVectorProduct(logits, refresh) if self.engine == "gauss_newton" else hvp_for(refresh)
                    h = estimate(self.estimator, engine, refresh, range(len(refresh)), generator)
        except RuntimeError as error:
            if "backward through the graph a second time" in str(error):
                raise RuntimeError(_GRAPH_FREED) from None
            clear = no_double_backward_error(error)
            if clear is None:
                raise
            raise clear from None
        h = [x.detach() for x in h]
        if scale != 1.0:  # the HVP of a scaled loss is scaled
            torch._foreach_div_(h, scale)
        distributed.all_reduce_mean_(h)  # every replica gets the same estimate
        if not _all_finite(h):  # e.g. an fp16 overflow: keep the previous estimate
            return {}
        return dict(zip(refresh, h))

    # ------------------------------------------------------------------------- updates

    def _update_group(self, group: dict[str, Any], hessians: dict[Tensor, Tensor], step: int) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad.detach() for p in params]
        bufs = [self.state[p].get("momentum_buffer") for p in params]
        if not group["second_order"]:
            sgd_functional(
                params,
                grads,
                bufs,
                foreach=group["foreach"],
                weight_decay=group["weight_decay"],
                momentum=group["momentum"],
                lr=group["lr"],
                dampening=0.0,
                nesterov=False,
                maximize=False,
            )
        else:
            states = [self._second_order_state(p) for p in params]
            fresh = [hessians.get(p) for p in params]
            # one multi-tensor add for the step counters (CPU scalars, as torch's Adam): a Python
            # `+= 1` per tensor costs host time that shows on a GPU
            torch._foreach_add_([s["step"] for s in states], 1.0)
            for state, h in zip(states, fresh):
                state["hessian_refreshes"] += h is not None
            if group["authors_code"]:
                c = 1 - group["momentum"] ** (step // len(self._one_d_params()) + 1)
                corrections: list[float | None] = [c] * len(params)
                alpha = group["momentum"]
            else:
                alpha = group["hessian_momentum"]
                corrections = [1 - alpha ** s["hessian_refreshes"] if s["hessian_refreshes"] else None for s in states]
            sgdph(
                params,
                grads,
                bufs,
                [s["hessian_ema"] for s in states],
                fresh,
                corrections,
                foreach=group["foreach"],
                lr=group["lr"],
                momentum=group["momentum"],
                weight_decay=group["weight_decay"],
                so_lr=group["so_lr"],
                hessian_momentum=alpha,
                eps=group["eps"],
                eps_in_correction=group["authors_code"],
                rule=group.get("rule", "paper"),
            )
        if group["momentum"] != 0:
            for p, buf in zip(params, bufs):
                self.state[p]["momentum_buffer"] = buf


# ----------------------------------------------------------------------------- functional API


def sgdph(
    params: list[Tensor],
    grads: list[Tensor],
    momentum_buffers: list[Tensor | None],
    hessian_emas: list[Tensor],
    hessians: list[Tensor | None],
    bias_corrections: list[float | None],
    *,
    foreach: bool | None = None,
    lr: float,
    momentum: float,
    weight_decay: float,
    so_lr: float,
    hessian_momentum: float,
    eps: float,
    eps_in_correction: bool = False,
    rule: str = DEFAULT_RULE,
) -> None:
    r"""Functional form of SGD-PH's second-order update (first-order params use torch's ``sgd``).

    For each tensor i, in place::

        buf ← g (no buffer yet, or β = 0: g itself)   else β·buf + g
        if hessians[i] is given:   D ← α·D + (1 - α)·|h|
        c = bias_corrections[i]
        c is None (no curvature yet):  θ ← θ - γ·(buf + λθ)
        otherwise:                     θ ← θ - γ·(r ⊙ buf + λθ),  D̂ = D / c
            r = τ / (D̂ + ε)                     rule "paper"
                τ·c / (D + ε)                   rule "paper", eps_in_correction (the authors' code)
                1 / (1 + D̂ / ε)                 rule "damped"
                (1 + ε) / (D̂ / mean(D̂) + ε)     rule "normalized" (mean over the tensor)

    ``momentum_buffers`` entries that are None are created (the list is updated). With
    ``foreach`` the tensors are grouped by device and dtype and updated with ``torch._foreach_*``
    kernels; the default follows torch (foreach on CUDA).
    """
    if not (
        len(params)
        == len(grads)
        == len(momentum_buffers)
        == len(hessian_emas)
        == len(hessians)
        == len(bias_corrections)
    ):
        raise ValueError(
            "sgdph: params, grads, momentum_buffers, hessian_emas, hessians and bias_corrections "
            "must have one entry per parameter"
        )
    check_choice("rule", rule, RULES)
    if eps_in_correction and rule != "paper":
        raise ValueError("eps_in_correction (the authors' code) goes with rule='paper'")
    if foreach is None:
        _, foreach = _default_to_fused_or_foreach(params, differentiable=False, use_fused=False)
    update = _multi_tensor_sgdph if foreach else _single_tensor_sgdph
    update(
        params,
        grads,
        momentum_buffers,
        hessian_emas,
        hessians,
        bias_corrections,
        lr=lr,
        momentum=momentum,
        weight_decay=weight_decay,
        so_lr=so_lr,
        hessian_momentum=hessian_momentum,
        eps=eps,
        eps_in_correction=eps_in_correction,
        rule=rule,
    )


def _step_denominators(
    emas: list[Tensor], corrections: list[float], *, so_lr: float, eps: float, eps_in_correction: bool, rule: str
) -> tuple[list[Tensor], float]:
    """``(denominators, numerator)`` with the step relative to SGD's ``r = numerator / denominator``
    per element, for tensors that have a curvature estimate (new tensors; ``emas`` are not
    changed). One implementation for both update paths; callers compute ``buf / d * numerator``."""
    if eps_in_correction:  # the authors' code: (D + ε) / c
        denoms = torch._foreach_add(emas, eps)
        torch._foreach_div_(denoms, corrections)
        return denoms, so_lr
    curvature = torch._foreach_div(emas, corrections)  # D̂
    if rule == "paper":
        torch._foreach_add_(curvature, eps)
        return curvature, so_lr
    if rule == "damped":
        torch._foreach_div_(curvature, eps)
        torch._foreach_add_(curvature, 1.0)
        return curvature, 1.0
    # normalized: a tensor whose curvature is all zero has mean 0 and 0/0 = nan there; it gets r = 1.
    relative = [torch.nan_to_num_(d / d.mean(), nan=1.0) for d in curvature]
    torch._foreach_add_(relative, eps)
    return relative, 1.0 + eps


def _single_tensor_sgdph(
    params,
    grads,
    momentum_buffers,
    hessian_emas,
    hessians,
    bias_corrections,
    *,
    lr,
    momentum,
    weight_decay,
    so_lr,
    hessian_momentum,
    eps,
    eps_in_correction,
    rule,
) -> None:
    for i, param in enumerate(params):
        grad = grads[i]
        if momentum != 0:
            buf = momentum_buffers[i]
            if buf is None:
                buf = momentum_buffers[i] = torch.clone(grad).detach()
            else:
                buf.mul_(momentum).add_(grad)
        else:
            buf = grad
        if hessians[i] is not None:
            hessian_emas[i].mul_(hessian_momentum).add_(hessians[i].abs(), alpha=1 - hessian_momentum)
        c = bias_corrections[i]
        if c is None:
            direction = buf.add(param, alpha=weight_decay) if weight_decay != 0 else buf
        else:
            (denom,), numerator = _step_denominators(
                [hessian_emas[i]], [c], so_lr=so_lr, eps=eps, eps_in_correction=eps_in_correction, rule=rule
            )
            direction = buf.div(denom).mul_(numerator)
            if weight_decay != 0:
                direction.add_(param, alpha=weight_decay)
        param.add_(direction, alpha=-lr)


def _multi_tensor_sgdph(
    params,
    grads,
    momentum_buffers,
    hessian_emas,
    hessians,
    bias_corrections,
    *,
    lr,
    momentum,
    weight_decay,
    so_lr,
    hessian_momentum,
    eps,
    eps_in_correction,
    rule,
) -> None:
    if not params:
        return
    grouped = Optimizer._group_tensors_by_device_and_dtype(
        [params, grads, momentum_buffers, hessian_emas, hessians],
        with_indices=True,  # type: ignore[list-item]
    )
    for (dev_params, dev_grads, dev_bufs, dev_emas, dev_hessians), indices in grouped.values():
        dev_params, dev_grads, dev_emas = (cast(list[Tensor], x) for x in (dev_params, dev_grads, dev_emas))
        if momentum != 0:
            old = [i for i, b in enumerate(dev_bufs) if b is not None]
            if old:
                old_bufs = [cast(Tensor, dev_bufs[i]) for i in old]
                torch._foreach_mul_(old_bufs, momentum)
                torch._foreach_add_(old_bufs, [dev_grads[i] for i in old])
            for i, b in enumerate(dev_bufs):
                if b is None:
                    dev_bufs[i] = momentum_buffers[indices[i]] = torch.clone(dev_grads[i]).detach()
            steps = cast(list[Tensor], dev_bufs)
        else:
            steps = dev_grads
        fresh = [i for i, h in enumerate(dev_hessians) if h is not None]
        if fresh:
            emas = [dev_emas[i] for i in fresh]
            torch._foreach_mul_(emas, hessian_momentum)
            torch._foreach_add_(
                emas, torch._foreach_abs([cast(Tensor, dev_hessians[i]) for i in fresh]), alpha=1 - hessian_momentum
            )
        corrections = [bias_corrections[j] for j in indices]
        pre = [i for i, c in enumerate(corrections) if c is not None]
        raw = [i for i, c in enumerate(corrections) if c is None]
        directions: list[Tensor] = [steps[i] for i in range(len(dev_params))]
        if pre:
            denoms, numerator = _step_denominators(
                [dev_emas[i] for i in pre],
                [cast(float, corrections[i]) for i in pre],
                so_lr=so_lr,
                eps=eps,
                eps_in_correction=eps_in_correction,
                rule=rule,
            )
            pre_dirs = torch._foreach_div([steps[i] for i in pre], denoms)
            torch._foreach_mul_(pre_dirs, numerator)
            if weight_decay != 0:
                torch._foreach_add_(pre_dirs, [dev_params[i] for i in pre], alpha=weight_decay)
            for i, d in zip(pre, pre_dirs):
                directions[i] = d
        if raw and weight_decay != 0:
            raw_dirs = torch._foreach_add([steps[i] for i in raw], [dev_params[i] for i in raw], alpha=weight_decay)
            for i, d in zip(raw, raw_dirs):
                directions[i] = d
        torch._foreach_add_(dev_params, directions, alpha=-lr)


# ----------------------------------------------------------------------------- helpers


def _loss_and_logits(value: Any) -> tuple[Tensor, Tensor | None]:
    """A closure or loss function returns the loss, or ``(loss, logits)`` for the estimates that read
    the logits."""
    if isinstance(value, (tuple, list)):
        if len(value) != 2:
            raise TypeError(f"the closure / loss_fn returned {len(value)} values; return loss or (loss, logits)")
        return value[0], value[1]
    return value, None


def _all_finite(tensors: list[Tensor]) -> bool:
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())


def _is_compiled(model: nn.Module | None) -> bool:
    if model is None:
        return False
    compiled = getattr(torch._dynamo.eval_frame, "OptimizedModule", ())
    return any(isinstance(m, compiled) for m in (model, getattr(model, "module", None)))


def _upgrade_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """sgdph-tools 0.1 kept the step count under a string key ``"sgdph"`` in ``state`` (which
    torch.distributed.checkpoint cannot map to a parameter); now each second-order parameter has a
    ``step``. Hutchinson's generator state is no longer needed (probes depend on the step)."""
    old = state_dict.get("state", {}).get("sgdph")
    if old is None:
        return state_dict
    state = {k: v for k, v in state_dict["state"].items() if k != "sgdph"}
    for group in state_dict["param_groups"]:
        if group.get("second_order"):
            for index in group["params"]:
                state[index] = dict(state.get(index, {}), step=torch.tensor(float(old["step"])))
    return dict(state_dict, state=state)
