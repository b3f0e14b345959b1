r"""Block-diagonal Hessian-free optimization (Zhang, Xiong, Bradbury, Socher 2017, arXiv 1712.07296).

The generalised Gauss-Newton matrix G of a softmax cross-entropy loss is approximated by its diagonal
blocks -- curvature between parameters of the same block only -- and each block's damped Newton
system is solved on its own by conjugate gradient from exact GGN-vector products::

    for each block b:   (G_bb + (λ + w)I) d_b = −(g_b + w θ_b)       (CG, at most cg_max_iters)
    v ← μ·v + d        θ ← θ + lr·v                                    (μ = momentum, 0 by default)

with λ the Levenberg-Marquardt damping and w an L2 weight decay (part of the objective, so its
curvature wI enters the system). What follows the paper and Martens (2010), whose Hessian-free
machinery the paper builds on, and what departs from it:

- **Blocks**: by default one block per module that owns parameters -- a conv/linear weight with its
  bias, a norm's gamma with its beta, a weight-normalised layer's direction, gamma and bias -- as the
  paper's "each layer". ``blocks=`` takes any partition (torch param-group dicts or lists of tensors).
- **Products**: exact ``G_bb v`` (``sgdph_tools.curvature.GGNVectorProduct``: J v by the double-vjp
  trick, the softmax's Hessian in closed form, Jᵀ by a vjp), restricted to the block, on a forward of
  the optimizer's own over the step's recorded inputs (``curvature_fraction`` of them: the paper's and
  Martens' separate, smaller curvature mini-batch; off by default: the whole batch), with BatchNorm
  buffers and the RNG put back. So a standard closure works although its backward freed the graph.
- **CG**: warm-started from the block's previous solution times ``cg_init_decay`` (Martens' ζ = 0.95),
  stopped after ``cg_max_iters`` products or at relative residual ``cg_tol`` (the issue's criterion;
  Martens stops on the quadratic's relative progress instead), never dividing by a non-positive
  curvature.
- **Damping**: λ adapted by Martens' Levenberg-Marquardt rule from ρ = (actual decrease) /
  (decrease the block-diagonal quadratic model predicted) for the step taken: ρ < ¼ → λ·3/2,
  ρ > ¾ → λ·2/3. The actual decrease is measured by calling the closure again at the new
  parameters, on the same batch (RNG and buffers as the first call): one more forward and backward
  per step (``adapt_damping=False`` skips it). The model is undamped (G + wI), as in Martens &
  Sutskever (2012). One λ for all blocks, as the paper; kept within [1e-8, 1e8] (or the initial λ,
  where that is outside: ``DAMPING_MIN``/``DAMPING_MAX``). A step that raises the batch's loss (ρ < 0,
  or a non-finite loss) is taken back and λ raised, as a trust-region method does, where Martens
  (2010) keeps every step: after many good steps λ can be small enough for one nearly undamped step to
  throw the network off (it did on digits).
- **Backtracking** (``backtracking=True``; off by default): CG iterates are kept after 1, 2, 3, 4,
  6, 8, 11, ... iterations (⌈1.3ʲ⌉, Martens); the loss is evaluated at each candidate from the last
  backwards and the one before the loss stops decreasing is taken. Blocks stop at different counts: a
  candidate is every block's latest kept iterate at or below that count.
- **Momentum** (``momentum``; 0 by default): a heavy-ball buffer over solved directions -- Martens'
  warm start is already a form of momentum; the option exists for comparison with SGD-type baselines.
- **The loss**: the optimizer never sees it; the GGN it builds is that of softmax cross-entropy with
  integer labels and mean reduction, whatever the closure computes. Recipes reject other losses
  (label smoothing).

Under ``DistributedDataParallel`` every product and every loss value is averaged across processes,
so each rank solves the same systems and takes the same step. The state (per parameter: the CG
solution for the warm start, the momentum buffer; the damping and the step count with the first
parameter, as ``torch.optim.LBFGS`` keeps its own) resumes bit for bit.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .. import distributed
from ..curvature.cg import conjugate_gradient
from ..curvature.gauss_newton import GGNVectorProduct
from ..curvature.recorded import RecordedForward
from ..curvature.replay import ClosureReplay

#: Martens (2010): λ·3/2 when the model over-promised (ρ < ¼), λ·2/3 when it was good (ρ > ¾)
DAMPING_UP, DAMPING_DOWN, RHO_LOW, RHO_HIGH = 1.5, 2.0 / 3.0, 0.25, 0.75
#: the adapted λ stays within these: a network whose loss no step can lower any more (a dead ReLU net
#: on shapes) had every step rejected and λ grown x1.5 per step past float32's range (3e38) after
#: ~220 steps -- an error from the next product; the other way λ underflowed to 1e-20 and below
DAMPING_MIN, DAMPING_MAX = 1e-8, 1e8
#: iteration counts whose CG iterates backtracking keeps: ⌈1.3ʲ⌉ (Martens 2010, Section 4.6)
BACKTRACK_GROWTH = 1.3


class BlockHessianFree(torch.optim.Optimizer):
    """Block-diagonal Hessian-free optimizer (see the module docstring for the method and its sources).

    ``model``: the network (its modules give the default blocks, and the optimizer reruns it on the
    recorded inputs for the curvature). ``lr`` scales the solved step (1.0: the step itself).
    ``damping``: λ, the initial Levenberg-Marquardt damping (fixed with ``adapt_damping=False``).
    ``step(closure)`` needs a closure that zeroes the gradients, runs the forward and
    ``loss.backward()``, and returns the loss or ``(loss, logits)``.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1.0,
        damping: float = 1.0,
        adapt_damping: bool = True,
        cg_max_iters: int = 20,
        cg_tol: float = 1e-3,
        blocks: Iterable[Any] | None = None,
        *,
        cg_init_decay: float = 0.95,
        momentum: float = 0.0,
        weight_decay: float = 0.0,
        backtracking: bool = False,
        curvature_fraction: float | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module (the network the closure runs), got {type(model).__name__}")
        for name, value, low, high in (
            ("lr", lr, 0.0, math.inf),
            ("damping", damping, 0.0, math.inf),
            ("cg_tol", cg_tol, 0.0, 1.0),
            ("cg_init_decay", cg_init_decay, 0.0, 1.0),
            ("momentum", momentum, 0.0, 1.0),
            ("weight_decay", weight_decay, 0.0, math.inf),
        ):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {value!r}")
            if not low <= value <= high or (name in ("lr", "damping") and value == 0):
                raise ValueError(
                    f"invalid {name}: {value} (must be in {'(' if name in ('lr', 'damping') else '['}{low}, {high}])"
                )
        if isinstance(cg_max_iters, bool) or not isinstance(cg_max_iters, int) or cg_max_iters < 1:
            raise ValueError(f"invalid cg_max_iters: {cg_max_iters!r} (must be an integer >= 1)")
        if curvature_fraction is not None and not (
            isinstance(curvature_fraction, (int, float)) and 0.0 < curvature_fraction <= 1.0
        ):
            raise ValueError(f"invalid curvature_fraction: {curvature_fraction} (must be in (0, 1], or None)")
        defaults = dict(lr=lr, momentum=momentum, weight_decay=weight_decay)
        super().__init__(_blocks(model, blocks), defaults)
        self.model = model
        self.damping0, self.adapt_damping = float(damping), bool(adapt_damping)
        self.cg_max_iters, self.cg_tol, self.cg_init_decay = cg_max_iters, float(cg_tol), float(cg_init_decay)
        self.backtracking, self.curvature_fraction = bool(backtracking), curvature_fraction
        self._recorded = RecordedForward(model, list(model.buffers()))
        self._recorded.purpose = "BlockHessianFree"
        self._finalizer = weakref.finalize(self, self._recorded.remove)
        #: what the last step measured: loss before and after, ρ, the damping used, CG iterations per block
        self.last_step: dict[str, Any] = {}

    # ----------------------------------------------------------------------------------- state

    @property
    def _params(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    @property
    def damping(self) -> float:
        """λ for the next step."""
        return self.state[self._params[0]].get("damping", self.damping0)

    # ------------------------------------------------------------------------------------ step

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Tensor:  # type: ignore[override]
        if closure is None:
            raise RuntimeError(
                "BlockHessianFree.step needs a closure (zero_grad, forward, loss.backward(), return the loss "
                "or (loss, logits)): it evaluates the loss again at the new parameters"
            )
        params = self._params
        replay = ClosureReplay(closure, params, {p.device for p in params}, list(self.model.buffers()), cheap=False)
        loss = _loss_of(replay.first())
        f0 = _mean_across_ranks(loss)
        lam = self.damping
        blocks = [
            Block(g, ps, -torch.cat([p.grad.add(p, alpha=g["weight_decay"]).reshape(-1) for p in ps]))
            for g in self.param_groups
            if (ps := [p for p in g["params"] if p.grad is not None])
        ]
        keep_at = _backtrack_counts(self.cg_max_iters) if self.backtracking else ()
        with self._products(blocks) as products:
            for block, product in zip(blocks, products):
                warm = [self.state[p].get("cg_solution") for p in block.params]
                x0 = None
                if all(w is not None for w in warm):
                    x0 = torch.cat([w.reshape(-1) for w in warm]).mul_(self.cg_init_decay)
                result = conjugate_gradient(
                    product, block.b, damping=lam, max_iters=self.cg_max_iters, tol=self.cg_tol, x0=x0, keep_at=keep_at
                )
                block.iterations = result.iterations
                block.iterates = result.iterates or {result.iterations: result.solution}
            directions = [blk.iterates[max(blk.iterates)] for blk in blocks]
            if not self.backtracking:
                steps, buffers = self._steps(blocks, directions)
                predicted = _model_change(products, blocks, steps) if self.adapt_damping else None
        f_new = None
        if self.backtracking:  # the losses move the parameters: outside the products' graph
            directions, f_new = self._backtrack(replay, blocks, f0)
            steps, buffers = self._steps(blocks, directions)
            if self.adapt_damping:  # the model's prediction for the candidate chosen: a fresh graph
                with self._products(blocks) as products:
                    predicted = _model_change(products, blocks, steps)
        moved = _move(blocks, steps)
        rho, rejected = None, False
        if self.adapt_damping or self.backtracking:
            if f_new is None:
                f_new = _mean_across_ranks(_loss_of(replay.again_loss(self._no_sync)))
            actual = f_new - f0 + _l2_change(blocks, steps)  # the objective's change, weight decay included
            # A step that raises the objective on the batch (or makes it non-finite) is taken back, as a
            # trust-region method rejects ρ < 0 (Martens 2010 keeps every step): with λ adapted down
            # over many good steps, one nearly undamped step can throw the network far off (measured on
            # digits: training losses of 2e19 and 7e19 after λ had been lowered by the LM rule).
            rejected = not actual <= 0  # NaN included
            if rejected:
                _restore(moved)
            if self.adapt_damping:
                rho = actual / predicted if predicted < 0 and math.isfinite(actual) else -math.inf
                if rho < RHO_LOW:
                    lam = min(lam * DAMPING_UP, max(DAMPING_MAX, self.damping0))
                elif rho > RHO_HIGH:
                    lam = max(lam * DAMPING_DOWN, min(DAMPING_MIN, self.damping0))
        if not rejected:
            for block, d, buf in zip(blocks, directions, buffers):
                for p, d_p in zip(block.params, _split(d, block.params)):
                    self.state[p]["cg_solution"] = d_p.clone()
                if buf is not None:
                    for p, v_p in zip(block.params, _split(buf, block.params)):
                        self.state[p]["momentum_buffer"] = v_p.clone()
        first = self.state[params[0]]
        first["damping"] = lam
        first["step"] = first.get("step", 0) + 1
        self.last_step = dict(
            loss=f0,
            loss_after=f_new,
            rho=rho,
            damping=lam,
            rejected=rejected,
            cg_iterations=[blk.iterations for blk in blocks],
        )
        return loss

    def _no_sync(self) -> contextlib.AbstractContextManager:
        """Around the closure's re-evaluations: no gradient all-reduce (their gradients are not read)."""
        if isinstance(self.model, nn.parallel.DistributedDataParallel):
            return self.model.no_sync()
        return contextlib.nullcontext()

    @contextlib.contextmanager
    def _products(self, blocks: list[Block]) -> Iterator[list[Callable[[Tensor], Tensor]]]:
        """Per block, ``v ↦ (G_bb + wI) v`` on its flattened parameters, from a forward of the
        optimizer's own on the recorded inputs (valid inside the block only)."""
        flat = [p for blk in blocks for p in blk.params]
        with self._recorded.rerun(flat, self.curvature_fraction or 1.0) as (logits, _), torch.enable_grad():
            engine = GGNVectorProduct(logits, flat)
            products, start = [], 0
            for blk in blocks:
                index = list(range(start, start + len(blk.params)))
                start += len(blk.params)
                products.append(_block_product(engine, blk.params, index, blk.group["weight_decay"]))
            yield products

    def _steps(self, blocks: list[Block], directions: list[Tensor]) -> tuple[list[Tensor], list[Tensor | None]]:
        """Per block, θ's change lr·v for solved directions d, v = μ·v_prev + d (d itself without
        momentum or on the first step), and the new momentum buffer (None without momentum)."""
        steps, buffers = [], []
        for blk, d in zip(blocks, directions):
            mu = blk.group["momentum"]
            previous = [self.state[p].get("momentum_buffer") for p in blk.params]
            if mu and all(v is not None for v in previous):
                v = torch.cat([v.reshape(-1) for v in previous]).mul_(mu).add_(d)
            else:
                v = d
            steps.append(v.mul(blk.group["lr"]))
            buffers.append(v if mu else None)
        return steps, buffers

    def _backtrack(self, replay: ClosureReplay, blocks: list[Block], f0: float) -> tuple[list[Tensor], float]:
        """Martens' backtracking: from the last kept CG count backwards, the candidate before the
        loss stops decreasing (each loss evaluated at the parameters that candidate's step gives)."""
        best: list[Tensor] = []
        best_f = math.inf
        for count in sorted({k for blk in blocks for k in blk.iterates}, reverse=True):
            candidate = [
                blk.iterates[max((k for k in blk.iterates if k <= count), default=min(blk.iterates))] for blk in blocks
            ]
            steps, _ = self._steps(blocks, candidate)
            f = self._loss_at(replay, blocks, steps)
            f = f if math.isfinite(f) else math.inf
            if best and f >= best_f:
                break
            if not best or f < best_f:
                best, best_f = candidate, f
        return best, best_f

    def _loss_at(self, replay: ClosureReplay, blocks: list[Block], steps: list[Tensor]) -> float:
        moved = _move(blocks, steps)
        try:
            return _mean_across_ranks(_loss_of(replay.again_loss(self._no_sync)))
        finally:
            _restore(moved)


@dataclass(eq=False)
class Block:
    """One block of a step: its param group, the parameters with a gradient, ``b = −(g + wθ)``
    flattened, and what CG gave (kept iterates by iteration count)."""

    group: dict[str, Any]
    params: list[Tensor]
    b: Tensor
    iterations: int = 0
    iterates: dict[int, Tensor] = field(default_factory=dict)


def _blocks(model: nn.Module, blocks: Iterable[Any] | None) -> list[dict[str, Any]]:
    """Param groups, one per block: the user's partition, or each module's own trainable parameters."""
    trainable = [p for p in model.parameters() if p.requires_grad]
    if blocks is None:
        groups, seen = [], set()
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
            seen.update(id(p) for p in own)
            if own:
                groups.append({"params": own, "block": name or "(root)"})
        return groups
    groups = []
    for i, block in enumerate(blocks):
        group = dict(block) if isinstance(block, dict) else {"params": block}
        if isinstance(group["params"], Tensor):
            raise TypeError(f"block {i}: params must be a list of tensors, not one tensor: pass [tensor]")
        group["params"] = list(group["params"])
        group.setdefault("block", str(i))
        groups.append(group)
    seen = {id(p) for g in groups for p in g["params"]}
    names = {id(p): n for n, p in model.named_parameters()}
    missing = [names[id(p)] for p in trainable if id(p) not in seen]
    if missing:
        raise ValueError(f"blocks leave out trainable parameters {missing[:3]}: add them to a block or freeze them")
    strangers = [p for g in groups for p in g["params"] if id(p) not in names]
    if strangers:
        raise ValueError("blocks hold a tensor that is not a parameter of model: pass the model's own parameters")
    return groups


def _block_product(engine: GGNVectorProduct, block: list[Tensor], index: list[int], weight_decay: float):
    """``v ↦ (G_bb + wI) v`` on the block's flattened parameters, averaged across processes."""

    def product(v: Tensor) -> Tensor:
        pieces = _split(v, block)
        with torch.enable_grad():
            out = engine(dict(zip(index, pieces)), index)
        flat = torch.cat([o.reshape(-1) for o in out])
        distributed.all_reduce_mean_([flat])
        return flat.add_(v, alpha=weight_decay) if weight_decay else flat

    return product


def _model_change(products, blocks: list[Block], steps: list[Tensor]) -> float:
    """The block-diagonal quadratic model's change for the step taken: Σ_b (g_bᵀs_b + ½ s_bᵀ(G_bb + wI)s_b)."""
    return sum(float(-(blk.b @ s) + 0.5 * (s @ product(s))) for product, blk, s in zip(products, blocks, steps))


def _l2_change(blocks: list[Block], steps: list[Tensor]) -> float:
    """½w(|θ|² − |θ − s|²) per block: the weight decay's part of the objective's change (θ already moved by s)."""
    total = 0.0
    for blk, s in zip(blocks, steps):
        if blk.group["weight_decay"]:
            theta = torch.cat([p.reshape(-1) for p in blk.params])
            total += 0.5 * blk.group["weight_decay"] * float(theta @ theta - (theta - s) @ (theta - s))
    return total


def _move(blocks: list[Block], steps: list[Tensor]) -> list[tuple[Tensor, Tensor]]:
    """θ ← θ + s for every block; returns (parameter, its value before) to restore it bit for bit."""
    moved = []
    for blk, s in zip(blocks, steps):
        for p, s_p in zip(blk.params, _split(s, blk.params)):
            moved.append((p, p.detach().clone()))
            p.add_(s_p)
    return moved


def _restore(moved: list[tuple[Tensor, Tensor]]) -> None:
    for p, before in moved:
        p.copy_(before)


def _split(flat: Tensor, block: list[Tensor]) -> list[Tensor]:
    return [piece.view_as(p) for piece, p in zip(flat.split([p.numel() for p in block]), block)]


def _backtrack_counts(max_iters: int) -> set[int]:
    counts, j = set(), 0
    while (k := math.ceil(BACKTRACK_GROWTH**j)) <= max_iters:
        counts.add(k)
        j += 1
    return counts | {max_iters}


def _loss_of(out: Any) -> Tensor:
    loss = out[0] if isinstance(out, (tuple, list)) else out
    if not isinstance(loss, Tensor) or loss.numel() != 1:
        raise TypeError(f"the closure must return the scalar loss or (loss, logits), got {type(out).__name__}")
    return loss.detach().reshape(())


def _mean_across_ranks(loss: Tensor) -> float:
    value = loss.double().clone()
    distributed.all_reduce_mean_([value])
    return float(value)
