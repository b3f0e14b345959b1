"""What each curvature estimate is and what it needs: the one table that the optimizer, the recipes,
``sgdph bench`` and ``sgdph hessian`` read.

An *estimator* says what is estimated; an *engine* says how the products ``M v`` it is built from are
computed (:mod:`.products`). ``gnb`` needs no products, so it ignores the engine. Torch-free, so that
recipe validation can read it without importing torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

#: Estimators built from products ``M v`` (:mod:`.estimators`).
PRODUCT_ESTIMATORS = ("rowsum", "hutchinson", "diagonal")
#: Every estimator: the product-based ones, then Gauss-Newton-Bartlett (:mod:`.gauss_newton`).
ESTIMATORS = (*PRODUCT_ESTIMATORS, "gnb")
#: Engines whose products are with the Hessian.
HESSIAN_ENGINES = ("autograd", "finite_difference")
#: Every engine: the Hessian ones, then exact Gauss-Newton (GGN) products.
ENGINES = (*HESSIAN_ENGINES, "gauss_newton")
#: The leading fraction of the step's batch that the sub-batch GNB estimate runs on where the project
#: chooses one (recipes; ``SGDPH(rule="block_newton", model=...)``): the study of docs/evidence.md.
DEFAULT_GNB_FRACTION = 0.25
#: Estimators whose estimate is random (a probe, sampled labels): averaged over draws when measured.
STOCHASTIC = ("hutchinson", "gnb")
#: Estimators that refresh one tensor per refreshing step (one product per tensor, or per element),
#: in a round robin; the others refresh every tensor at once.
ROUND_ROBIN = ("rowsum", "diagonal")


def check_choice(kind: str, value: str, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {kind} {value!r}; choose one of {', '.join(map(repr, choices))}")


@dataclass(frozen=True)
class Needs:
    """What one (estimator, engine, gnb_fraction) choice needs from the step that feeds it."""

    #: the estimate differentiates the backward (autograd HVPs; the double vjp of GGN products):
    #: no fused attention, no ``torch.compile``, no DDP reducer in the way
    double_backward: bool
    #: the caller's own backward must keep the graph (``create_graph=True``): timm's
    #: ``is_second_order``. True for the double backward and for estimates that read the logits
    #: after the backward.
    keeps_graph: bool
    #: the estimate reads the step's logits: the closure or ``loss_fn`` returns ``(loss, logits)``
    reads_logits: bool
    #: the estimate evaluates the loss again at another point: a closure or ``loss_fn`` is needed
    evaluates_again: bool
    #: the estimate runs its own forward on a sub-batch: ``model=`` is needed
    needs_model: bool
    #: one estimate covers every tensor (else one tensor per refresh, round robin)
    refreshes_all: bool

    @property
    def compilable(self) -> bool:
        """``torch.compile`` can differentiate the model for this choice (no double backward)."""
        return not self.double_backward


def needs(
    estimator: str, engine: str = "autograd", gnb_fraction: float | None = None, exact_blocks: bool = False
) -> Needs:
    """The needs of an estimate; ``engine`` is ignored for ``gnb``, ``gnb_fraction`` for the others.
    ``exact_blocks``: some tensors are also solved exactly on their Gauss-Newton block at every step
    (``rule="block_newton"`` with ``engine="gauss_newton"``): GGN products read the step's logits
    through their graph."""
    base = _estimator_needs(estimator, engine, gnb_fraction)
    if not exact_blocks:
        return base
    return replace(base, double_backward=True, keeps_graph=True, reads_logits=True)


def _estimator_needs(estimator: str, engine: str, gnb_fraction: float | None) -> Needs:
    check_choice("estimator", estimator, ESTIMATORS)
    if estimator == "gnb":
        own_forward = gnb_fraction is not None
        return Needs(
            double_backward=False,
            keeps_graph=not own_forward,
            reads_logits=not own_forward,
            evaluates_again=False,
            needs_model=own_forward,
            refreshes_all=True,
        )
    check_choice("engine", engine, ENGINES)
    return Needs(
        double_backward=engine in ("autograd", "gauss_newton"),
        keeps_graph=engine != "finite_difference",
        reads_logits=engine == "gauss_newton",
        evaluates_again=engine == "finite_difference",
        needs_model=False,
        refreshes_all=estimator not in ROUND_ROBIN,
    )


def training_modes() -> list[tuple[str, str | None]]:
    """Every (estimator, engine) a training run would use, ``diagonal`` left out (one product per
    element is a diagnostic); ``gnb`` last, with no engine."""
    return [(e, g) for e in PRODUCT_ESTIMATORS if e != "diagonal" for g in ENGINES] + [("gnb", None)]


def measured_combinations() -> list[tuple[str, str]]:
    """Every (product estimator, engine) pair: what ``sgdph hessian`` compares with the exact blocks."""
    return [(e, g) for e in PRODUCT_ESTIMATORS for g in ENGINES]
