"""SGD with Partial Hessian (SGD-PH), in the style of ``torch/optim/sgd.py``: the :class:`SGDPH` class
gathers gradients, curvature estimates (from :mod:`sgdph_tools.curvature`) and state, and calls the
functional :func:`~sgdph_tools.optim.functional.sgdph`."""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor
from torch.optim import Optimizer

from ..curvature import ENGINES, ESTIMATORS, AmpScale, Needs, StepCurvature, check_choice
from ..curvature.capabilities import DEFAULT_GNB_FRACTION, STOCHASTIC
from ..curvature.sharded import check_sharded, is_sharded
from .block import (
    BLOCK_RULES,
    DEFAULT_BLOCK_CHUNKS,
    DEFAULT_BLOCK_MAX,
    DEFAULT_CG_STEPS,
    BlockInverses,
    block_estimates,
    exact_mode,
    exactly_solved,
    keeps_block,
)
from .compiled import CompiledUpdate
from .flat import FlatSecondOrder
from .functional import DEFAULT_EPS, DEFAULT_RULE, DEFAULT_SO_LR, RULES, sgdph  # noqa: F401  (sgdph: old path)
from .param_groups import second_order_groups
from .refresh import RefreshSchedule, start_round_robin
from .settings import GROUP_NUMBERS, OPTIMIZER_WIDE, check_settings, renamed_scaler, upgrade_state_dict
from .update import second_order_state, update_group

__all__ = ["SGDPH", "sgdph", "OPTIMIZER_WIDE"]


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

    Refresh schedule (:mod:`sgdph_tools.optim.refresh`): ``rowsum`` (and ``diagonal``) refresh ONE
    second-order tensor per refreshing step, round robin; ``hutchinson`` and ``gnb`` refresh all of
    them. A step is refreshing when ``(t - 1) % hessian_every == 0``. The estimates themselves come from
    :mod:`sgdph_tools.curvature`; this class only updates.

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
        so_lr: second-order learning rate τ (default per rule: 1e-3; ``block_newton`` 1e-2).
        hessian_momentum: α of the Hessian EMA (default 0.9; ``authors_code`` uses β).
        eps: ε of the rule; default per rule (``DEFAULT_EPS``): ``paper`` 1e-4 (the paper's),
            ``damped`` 0.3, ``normalized`` 0.3, ``block_newton`` 1e-3 (each in its own units).
        rule: ``"normalized"`` (default; ``docs/evidence.md``), ``"paper"`` (Algorithm 1),
            ``"damped"`` (above) or ``"block_newton"``: ``(G_kk + εI)d = buf`` per tensor, θ ← θ -
            γ(τd + λθ) -- :mod:`sgdph_tools.optim.block` says what estimator (gnb: the block estimate,
            the default; engine gauss_newton: exact CG), ``gnb_fraction``, ``hessian_momentum`` and
            ``hessian_every`` mean there; ``cg_steps``, ``block_max``, ``block_chunks`` are its knobs;
            ``"block_normalized"``: the same blocks at SGD's step length (ε relative). Per group.
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
            the global hook that restores BatchNorm statistics after an extra forward). The optimizer
            puts a forward pre-hook on it (to record the inputs that ``gnb_fraction`` takes its
            sub-batch from); :meth:`close`, or collecting the optimizer, removes it.

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

    With AMP (fp16), ``scaler.scale(loss).backward(create_graph=optimizer.is_second_order)``,
    ``scaler.step(optimizer)``, ``scaler.update()`` works as with any optimizer, through torch's protocol
    (GradScaler sets ``grad_scale`` and ``found_inf`` on the optimizer): the step unscales the gradients,
    is skipped when one is not finite, and the HVP of the scaled loss is divided by the scale -- also
    when the caller unscaled first, to clip. In usage B the gradients only appear inside ``step``, so
    the scaler is handed to it: ``step(loss_fn=fn, scaler=scaler)``, then ``scaler.update()``.
    """

    _step_supports_amp_scaling = True  # GradScaler.step sets grad_scale / found_inf: the HVP needs the scale

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        *,
        so_lr: float | None = None,
        hessian_momentum: float = 0.9,
        eps: float | None = None,
        estimator: str | None = None,
        engine: str = "autograd",
        hessian_every: int = 1,
        gnb_fraction: float | None = None,
        authors_code: bool = False,
        rule: str | None = None,
        seed: int = 0,
        foreach: bool | None = None,
        model: nn.Module | None = None,
        cg_steps: int = DEFAULT_CG_STEPS,
        block_max: int = DEFAULT_BLOCK_MAX,
        block_chunks: int | None = DEFAULT_BLOCK_CHUNKS,
    ):
        if isinstance(params, Tensor):
            raise TypeError("params must be an iterable of tensors or param-group dicts, not one tensor: pass [tensor]")
        if rule is None:
            rule = "paper" if authors_code else DEFAULT_RULE
        check_choice("rule", rule, RULES)
        eps = DEFAULT_EPS[rule] if eps is None else eps
        so_lr = DEFAULT_SO_LR[rule] if so_lr is None else so_lr
        if estimator is None:  # block_newton alone is its cheap mode: the GNB block estimate
            estimator = "gnb" if rule in BLOCK_RULES else "rowsum"
            if rule in BLOCK_RULES and gnb_fraction is None and model is not None:
                gnb_fraction = DEFAULT_GNB_FRACTION
        check_settings(
            lr=lr,
            momentum=momentum,
            weight_decay=weight_decay,
            so_lr=so_lr,
            hessian_momentum=hessian_momentum,
            eps=eps,
            cg_steps=cg_steps,
            block_max=block_max,
            block_chunks=block_chunks,
        )
        if foreach is not None and not isinstance(foreach, bool):
            raise TypeError(f"foreach must be True, False or None (torch's default), got {foreach!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an integer, got {seed!r}")
        if not (isinstance(hessian_every, int) and hessian_every >= 1):
            raise ValueError(f"invalid hessian_every: {hessian_every} (must be an integer >= 1)")
        check_choice("estimator", estimator, ESTIMATORS)
        check_choice("engine", engine, ENGINES)
        if authors_code and rule != "paper":
            raise ValueError(f"authors_code=True is the authors' rule: rule='paper' (got rule={rule!r})")
        if authors_code:
            if estimator != "rowsum" or hessian_every != 1:
                raise ValueError("authors_code=True is the authors' rule: estimator='rowsum', hessian_every=1")
            if not 0.0 < momentum < 1.0:
                raise ValueError("authors_code=True needs 0 < momentum < 1 (their Hessian EMA uses it)")
        if gnb_fraction is not None:
            if not (isinstance(gnb_fraction, (int, float)) and 0.0 < gnb_fraction <= 1.0):
                raise ValueError(f"invalid gnb_fraction: {gnb_fraction} (must be in (0, 1], or None)")
            if estimator != "gnb":
                raise ValueError(f"gnb_fraction applies to estimator='gnb' only (got estimator={estimator!r})")
        self.model = model
        self._flat: dict[int, FlatSecondOrder | None] = {}  # per second-order group, built on use (flat.py)
        self._compiled: CompiledUpdate | None = None  # compile_update()
        self._step_count: int | None = None  # mirror of the largest per-parameter "step" (host time)
        #: gradients and estimates (sgdph_tools.curvature); holds the model's hook, not the optimizer
        self.curvature = StepCurvature(model)
        self.curvature.configure(estimator, engine, gnb_fraction)
        # The hook goes with the optimizer: no strong reference from the finalizer back to self.
        self._finalizer = weakref.finalize(self, self.curvature.close)
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
            cg_steps=cg_steps,
            block_max=block_max,
            block_chunks=block_chunks,
        )
        self._inverses: dict[int, BlockInverses] = {}  # block_newton's cached inverses per group (block.py)
        super().__init__(second_order_groups(params, authors_code=authors_code), defaults)
        self._configure_blocks()

    def _configure_blocks(self) -> None:
        """``block_newton`` groups need Gauss-Newton curvature; with ``engine="gauss_newton"`` they are
        solved exactly at every step (the curvature then reads the logits, whatever the estimator)."""
        self._exact_blocks = exact = exact_mode(self.param_groups, self.estimator, self.engine, self.hessian_every)
        self.curvature.block_chunks = self.param_groups[0]["block_chunks"]
        self.curvature.configure(self.estimator, self.engine, self.gnb_fraction, exact)
        check_sharded(self.param_groups, self.estimator, self.engine, self.gnb_fraction)  # FSDP2: before a step

    @property
    def gnb_fraction(self) -> float | None:
        return self.param_groups[0]["gnb_fraction"]

    def compile_update(self, mode: str = "default") -> None:
        """The repeating steps' arithmetic through ``torch.compile`` (:mod:`.compiled`; FSDP2: the passes only)."""
        sharded = is_sharded(p for g in self.param_groups for p in g["params"])  # FSDP2: the update stays eager
        self._compiled = None if sharded else CompiledUpdate(mode)
        self.curvature.compile_passes(mode, sub_batch=not sharded)  # no activation reuse: its hooks recompile

    def close(self) -> None:
        """Remove the forward hook the optimizer put on ``model`` (also done when it is collected)."""
        self._finalizer()

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
    def authors_code(self) -> bool:
        return self.param_groups[0]["authors_code"]

    @property
    def needs(self) -> Needs:
        """What the optimizer's curvature estimate needs from a step (:func:`sgdph_tools.curvature.needs`)."""
        return self.curvature.needs

    @property
    def is_second_order(self) -> bool:
        """timm's convention: True when the caller's backward must keep the graph (``create_graph``):
        for the double backward of the autograd engine, and for the estimates that read the logits
        (``gnb``, ``gauss_newton``) after the backward. The finite-difference engine and ``gnb`` with
        ``gnb_fraction`` (its own forward) need none."""
        return self.needs.keeps_graph

    @property
    def reuse_activations(self) -> bool:
        """Finite differences along one tensor reuse the activations below it (needs ``model``)."""
        return self.curvature.reuse_activations

    @reuse_activations.setter
    def reuse_activations(self, value: bool) -> None:
        self.curvature.reuse_activations = bool(value)

    @property
    def refresh_schedule(self) -> RefreshSchedule:
        """When the curvature is refreshed and for which tensors (:mod:`sgdph_tools.optim.refresh`)."""
        group = self.param_groups[0]
        return RefreshSchedule(
            group["hessian_every"], not self.needs.refreshes_all, group["authors_code"], group["seed"]
        )

    def start_round_robin(self, index: int) -> None:
        """Make the next round-robin refresh take the ``index``-th second-order tensor."""
        start_round_robin(self.state, self._second_order_params(), index)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        for key in OPTIMIZER_WIDE:
            if key in param_group and param_group[key] != self.defaults[key]:
                raise ValueError(
                    f"{key} is optimizer-wide: a param group cannot set {key}={param_group[key]!r} "
                    f"(the optimizer's is {self.defaults[key]!r})"
                )
        if "rule" in param_group:  # a group with its own rule gets that rule's ε and τ unless it sets them
            check_choice("rule", param_group["rule"], RULES)
            if param_group["rule"] != "paper" and self.defaults["authors_code"]:
                raise ValueError("authors_code=True is the authors' rule: a param group cannot set another rule")
            param_group.setdefault("eps", DEFAULT_EPS[param_group["rule"]])
            param_group.setdefault("so_lr", DEFAULT_SO_LR[param_group["rule"]])
        if not isinstance(param_group, dict) or "params" not in param_group:
            raise ValueError("a param group is a dict with 'params', e.g. {'params': [...], 'lr': 0.1}")
        own = {k: param_group[k] for k in GROUP_NUMBERS if k in param_group and param_group[k] is not None}
        try:
            check_settings(**own)
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"param group: {exc}") from None
        groups = [param_group] if "second_order" in param_group else second_order_groups([param_group])
        for group in groups:
            super().add_param_group(group)
        if hasattr(self, "curvature") and hasattr(self, "_exact_blocks"):  # a later group may bring block_newton
            self._configure_blocks()
        for group in groups:
            self._init_state(group)
        self._flat, self._step_count, self._inverses = {}, None, {}

    def _init_state(self, group: dict[str, Any]) -> None:
        """Create the state eagerly, as a step would: torch.distributed.checkpoint builds its load
        template from a fresh optimizer's state (and would otherwise call ``step()`` with zero
        gradients and no graph to create it). A zero momentum buffer gives exactly the lazy one's
        first value, β·0 + g = g."""
        for p in group["params"]:
            if group["momentum"] != 0 and p.requires_grad and "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            if group["second_order"]:
                second_order_state(self.state, p, keeps_block(group, p, self.defaults["engine"] == "gauss_newton"))

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's, plus: the checkpoint's optimizer-wide settings replace the constructor's (with a
        warning naming them), and checkpoints of sgdph-tools 0.1 (an ``"sgdph"`` state entry) load."""
        constructed = {k: self.defaults[k] for k in OPTIMIZER_WIDE}
        super().load_state_dict(upgrade_state_dict(state_dict))
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
        self._flat, self._step_count, self._inverses = {}, None, {}  # rebuilt from the loaded state
        self._configure_blocks()

    def _second_order_params(self) -> list[Tensor]:
        return [p for g in self.param_groups if g["second_order"] for p in g["params"]]

    def _steps_taken(self) -> int:
        """The optimizer's step count: the largest per-parameter count of the second-order params (read
        from the state once, then kept as a Python int: a float() of each counter costs host time)."""
        if self._step_count is None:
            steps = [self.state[p]["step"] for p in self._second_order_params() if "step" in self.state.get(p, {})]
            self._step_count = int(max(float(s) for s in steps)) if steps else 0
        return self._step_count

    # ------------------------------------------------------------------------- step

    def step(
        self,
        closure: Callable[[], Any] | None = None,
        *,
        loss_fn: Callable[[], Tensor] | None = None,
        scaler: torch.amp.GradScaler | None = None,
        max_grad_norm: float | None = None,
        **renamed: Any,
    ) -> Tensor | None:
        """One optimization step. See the class docstring for the three usages.

        ``scaler`` (usage B): the GradScaler that scales the loss inside the step; ``max_grad_norm``
        (closure or ``loss_fn``): clip the total gradient norm after the gradients are computed,
        averaged across processes and unscaled -- a caller cannot, since they appear inside ``step``.
        The Hessian estimate is not clipped. (``grad_scaler=`` is the old name of ``scaler=``.)
        """
        scaler = renamed_scaler(scaler, renamed)
        if closure is not None and loss_fn is not None:
            raise ValueError("pass either a closure (which calls backward) or loss_fn (which does not), not both")
        if max_grad_norm is not None and closure is None and loss_fn is None:
            raise ValueError("max_grad_norm needs a closure or loss_fn; without them clip .grad yourself before step()")
        step = self._steps_taken() + 1
        schedule = self.refresh_schedule
        params = [p for g in self.param_groups for p in g["params"] if p.requires_grad]
        second_order = [p for g in self.param_groups if g["second_order"] for p in g["params"] if p.requires_grad]
        refreshing = bool(second_order) and schedule.refreshes(step)
        cut = None
        if refreshing and (closure is not None or loss_fn is not None) and not self.authors_code:
            # finite differences along the one tensor a round-robin refresh perturbs record the
            # activations below it during the forward; the choice is made again once the grads are known
            if self.curvature.reuses_activations():
                predicted = schedule.choose(step, second_order, self.state)
                cut = self.curvature.activations_to_reuse(predicted[0], {p.device for p in params})
        amp = AmpScale(scaler, getattr(self, "grad_scale", None), getattr(self, "found_inf", None))
        grads = self.curvature.gradients(
            self, params, second_order, closure=closure, loss_fn=loss_fn, refreshing=refreshing, amp=amp, cut=cut
        )
        if grads.skipped:  # a non-finite gradient under a loss scale: no state changes, as GradScaler
            self._free_graph()
            return grads.loss
        if max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_([p for p in params if p.grad is not None], max_grad_norm)
        hessians: dict[Tensor, Tensor] = {}
        solved = exactly_solved(self.param_groups) if self._exact_blocks else []
        product = None
        if solved:  # block_newton's exact mode: CG on this step's GGN blocks, in the update
            product = self.curvature.block_product(grads, solved)
        if refreshing:
            exempt = set(solved)
            with_grad = [p for p in second_order if p.grad is not None and p not in exempt]
            refresh = schedule.choose(step, with_grad, self.state, self._one_d_params())
            if refresh:
                # a probe of FSDP's global product is one vector, drawn alike on every rank and sliced
                shared = self.estimator == "hutchinson" and is_sharded(refresh)
                generator = schedule.generator(step, shared) if self.estimator in STOCHASTIC else None
                blocks = block_estimates(self.param_groups, refresh, self._exact_blocks)
                hessians = self.curvature.estimate(grads, refresh, generator, blocks)
        with torch.no_grad():  # each group by update.py; one_d: the authors' round-robin period
            index, one_d = {p: k for k, p in enumerate(solved)}, len(self._one_d_params())
            context = (self._flat, self._inverses, product, index, self._exact_blocks, self._compiled)
            updated = [update_group(self.state, g, hessians, step, one_d, *context) for g in self.param_groups]
        if any(updated):
            self._step_count = step
        if loss_fn is None and self.needs.keeps_graph:  # a caller's backward may hold a graph in .grad
            self._free_graph()
        return grads.loss

    def _free_graph(self) -> None:
        """Detach ``.grad``: one built with ``create_graph`` keeps its graph alive (param <-> grad cycle)."""
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None and p.grad.requires_grad:
                    p.grad = p.grad.detach()

    def _one_d_params(self) -> list[Tensor]:
        """Every 1-D parameter in order: the authors' round robin and its period M."""
        if not self.authors_code:
            return []
        return [p for g in self.param_groups for p in g["params"] if p.ndim == 1]
