"""How exact each curvature estimate is, on a real model and batch: the engine behind ``sgdph hessian``.

For each selected 1-D tensor k, the exact rows of its Hessian block ``H_kk`` and of its Gauss-Newton
block ``G_kk`` are computed in float64 (one product per channel, on at most ``max_channels`` channels
chosen evenly: the rows are whole, so their row sums are exact too). Then every estimator × engine
runs in the dtype asked and is compared, on those channels, with the exact quantity it claims:

| estimator | autograd / finite_difference | gauss_newton | (none) |
|---|---|---|---|
| rowsum | ``H_kk·1`` | ``G_kk·1`` | |
| hutchinson | ``diag H`` (mean of ``draws`` probes) | ``diag G`` (mean of ``draws``) | |
| diagonal | ``diag H`` | ``diag G`` | |
| gnb | | | ``diag G`` (mean of ``draws``) |

``gnb`` runs on the whole batch's logits and, as the optimizer's ``gnb_fraction`` does, from its own
forward on the batch's first half and quarter: its target stays the whole batch's ``diag G``, so
those rows show what the cheaper estimate costs in accuracy (BatchNorm on fewer examples, fewer
examples averaged).

Then, per tensor small enough for its whole block (``precondition_max`` entries), how well each
curvature model preconditions it (:func:`preconditioning`): on the quadratic model ``½dᵀAd − gᵀd``
of the batch's loss along the tensor (``A = G_kk + δI``, δ a thousandth of ``G_kk``'s mean
diagonal), the decrease a line search along each model's direction gets, as a fraction of the best
any direction gets (the exact block's ``A⁻¹g``: 1), and the condition number of ``P⁻¹A``.

The model runs in train mode (BatchNorm on batch statistics, as in training) with its stochastic
layers (dropout, drop-path) switched off, so every evaluation computes the same function.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from .curvature import (
    AutogradHVP,
    FiniteDifferenceHVP,
    ForwardReplay,
    GGNVectorProduct,
    estimate,
    gauss_newton_bartlett,
    math_attention,
)
from .curvature.capabilities import STOCHASTIC, measured_combinations
from .curvature.gauss_newton import bartlett_row_curvature, bartlett_rows
from .optim import sgdph_param_groups

COMBINATIONS = measured_combinations()  # then gnb, which needs no engine
GNB_FRACTIONS = (1.0, 0.5, 0.25)


def deterministic_train_mode(model: nn.Module) -> nn.Module:
    """Train mode (BatchNorm normalises with batch statistics), but dropout and drop-path off (their
    masks would change between evaluations) and no running statistics kept: their in-place update
    by one evaluation would invalidate the graphs the others keep."""
    model.train()
    for m in model.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) or type(m).__name__ in ("DropPath", "DropBlock2d"):
            m.eval()
        if isinstance(m, nn.modules.batchnorm._NormBase):
            m.track_running_stats = False
    return model


def select_tensors(model: nn.Module, pattern: str = "*", max_tensors: int = 8) -> list[str]:
    """Names of the second-order tensors (by their tags) matching the glob ``pattern``."""
    groups = [g for g in sgdph_param_groups(model) if g["second_order"]]
    names = groups[0]["param_names"] if groups else []
    return [n for n in names if fnmatch.fnmatch(n, pattern)][:max_tensors]


class _Engines:
    """The three product engines and the logits, for one batch, on the tensors ``names`` of ``model``.
    The finite-difference engine perturbs its parameters in place, which would invalidate the graph
    the other two keep: it gets its own copy of the model."""

    def __init__(self, model: nn.Module, x: Tensor, y: Tensor, names: Sequence[str], *, finite_difference: bool = True):
        params = [dict(model.named_parameters())[n] for n in names]
        with torch.enable_grad(), math_attention():
            self.logits = model(x)
            loss = F.cross_entropy(self.logits, y)
            grads = torch.autograd.grad(loss, params, create_graph=True)
        self.grads = [g.detach() for g in grads]
        self.autograd = AutogradHVP(grads, params)
        self.gauss_newton = GGNVectorProduct(self.logits, params)
        if not finite_difference:
            return
        twin = copy.deepcopy(model)
        twin_params = [dict(twin.named_parameters())[n] for n in names]
        replay = ForwardReplay(lambda: F.cross_entropy(twin(x), y), {p.device for p in twin_params})
        with torch.enable_grad():
            g0 = torch.autograd.grad(replay.first(), twin_params)
        self.finite_difference = FiniteDifferenceHVP(replay, twin_params, [g.detach() for g in g0])

    def engine(self, name: str):
        return getattr(self, name)


def _rows(engine, k: int, n: int, channels: Sequence[int], like: Tensor) -> Tensor:
    """Rows ``channels`` of tensor k's block, each whole: ``[len(channels), n]``."""
    rows = []
    for j in channels:
        e = torch.zeros(n, dtype=like.dtype, device=like.device)
        e[j] = 1.0
        rows.append(engine({k: e.view_as(like)}, [k])[0].reshape(-1))
    return torch.stack(rows)


def _off_diagonal_ratio(rows: Tensor, channels: Sequence[int]) -> float:
    """‖off-diagonal‖ / ‖diagonal‖ (Frobenius) of the sub-block on ``channels``."""
    block = rows[:, list(channels)]
    diag = torch.diagonal(block)
    return float((block - torch.diag(diag)).norm() / diag.norm()) if diag.norm() > 0 else float("nan")


def _compare(estimate_: Tensor, target: Tensor) -> tuple[float, float]:
    e, t = estimate_.double().reshape(-1), target.double().reshape(-1)
    cosine = float(F.cosine_similarity(e, t, dim=0)) if e.norm() > 0 and t.norm() > 0 else float("nan")
    relative = float((e - t).norm() / t.norm()) if t.norm() > 0 else float("nan")
    return cosine, relative


def exactness_report(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    names: Sequence[str],
    *,
    dtype: torch.dtype = torch.float32,
    max_channels: int = 32,
    draws: int = 100,
    seed: int = 0,
    precondition_max: int = 256,
    block_draws: int = 10,
    block_chunks: int | None = 8,
) -> dict:
    """Block structure and every estimate's agreement with its exact target, per tensor in ``names``;
    how well each curvature model preconditions the tensors of at most ``precondition_max`` entries,
    the GNB models averaged over ``block_draws`` draws, from 1, ``block_chunks`` and B chunks of rows
    (:func:`preconditioning`)."""
    if not names:
        raise ValueError("no tensor selected: the model has no second-order tensor matching the pattern")
    exact_model = deterministic_train_mode(copy.deepcopy(model).double())
    test_model = deterministic_train_mode(copy.deepcopy(model).to(dtype))
    exact_params = [dict(exact_model.named_parameters())[n] for n in names]
    test_params = [dict(test_model.named_parameters())[n] for n in names]
    exact = _Engines(exact_model, x.double(), y, names, finite_difference=False)  # exact rows need no FD
    test = _Engines(test_model, x.to(dtype), y, names)

    blocks, rows_out = [], []
    channels_of, targets = {}, {}
    for k, (name, p) in enumerate(zip(names, exact_params)):
        n = p.numel()
        channels = sorted({round(i * (n - 1) / max(1, min(n, max_channels) - 1)) for i in range(min(n, max_channels))})
        channels_of[k] = channels
        H = _rows(exact.autograd, k, n, channels, p)
        G = _rows(exact.gauss_newton, k, n, channels, p)
        targets[k] = {
            "H·1": H.sum(1),
            "diag H": H[range(len(channels)), channels],
            "G·1": G.sum(1),
            "diag G": G[range(len(channels)), channels],
        }
        blocks.append(
            {
                "tensor": name,
                "numel": n,
                "channels": len(channels),
                "hessian_off_diagonal": _off_diagonal_ratio(H, channels),
                "ggn_off_diagonal": _off_diagonal_ratio(G, channels),
            }
        )

    generator = torch.Generator().manual_seed(seed)
    all_k = list(range(len(names)))
    runs = [(est, eng, None) for est, eng in COMBINATIONS] + [("gnb", None, f) for f in GNB_FRACTIONS]
    for estimator, engine_name, fraction in runs:
        matrix = "G" if engine_name in ("gauss_newton", None) else "H"
        target_key = f"{matrix}·1" if estimator == "rowsum" else f"diag {matrix}"
        if estimator == "gnb":
            rows = min(len(x), max(2, round(fraction * len(x))))
            with torch.enable_grad():
                logits = test.logits if rows == len(x) else test_model(x[:rows].to(dtype))
            samples = [gauss_newton_bartlett(logits, test_params, generator) for _ in range(draws)]
        elif estimator == "hutchinson":
            samples = [
                estimate("hutchinson", test.engine(engine_name), test_params, all_k, generator) for _ in range(draws)
            ]
        elif estimator == "rowsum":
            samples = [estimate("rowsum", test.engine(engine_name), test_params, all_k)]
        else:  # diagonal: only the chosen channels, one product each
            engine = test.engine(engine_name)
            samples = [
                [
                    _rows(engine, k, p.numel(), channels_of[k], p)[range(len(channels_of[k])), channels_of[k]]
                    for k, p in enumerate(test_params)
                ]
            ]
        for k, name in enumerate(names):
            values = torch.stack([s[k].detach().reshape(-1) for s in samples]).double().mean(0)
            if estimator != "diagonal":
                values = values[channels_of[k]]
            cosine, relative = _compare(values, targets[k][target_key])
            rows_out.append(
                {
                    "tensor": name,
                    "estimator": estimator,
                    "engine": engine_name,
                    "gnb_fraction": fraction,
                    "target": target_key,
                    "draws": draws if estimator in STOCHASTIC else 1,
                    "cosine": cosine,
                    "relative_error": relative,
                }
            )
    conditioning = []
    for k, (name, p) in enumerate(zip(names, exact_params)):
        if p.numel() > precondition_max:
            continue
        G = _rows(exact.gauss_newton, k, p.numel(), range(p.numel()), p)
        estimates = {
            f"gnb block, {c} chunk{'s' if c > 1 else ''}": torch.stack(
                [
                    bartlett_row_curvature(*bartlett_rows(exact.logits, [p], c, generator), [True])[0]
                    for _ in range(block_draws)
                ]
            ).mean(0)
            for c in sorted({1, block_chunks, len(x)} - {None})
        }
        models = preconditioning(G, exact.grads[k].reshape(-1), estimates)
        for model_name, result in models.items():
            conditioning.append({"tensor": name, "numel": p.numel(), "model": model_name, **result})
    return {
        "dtype": str(dtype).removeprefix("torch."),
        "blocks": blocks,
        "estimates": rows_out,
        "preconditioning": conditioning,
        "block_draws": block_draws,
    }


#: Relative damping of the preconditioning comparison: δ = this x mean(diag G_kk).
RELATIVE_DAMPING = 1e-3


def _relative(block: Tensor, eps: float) -> Tensor:
    """``block / mean(diag block) + εI``: the damped block of ``rule="block_normalized"``."""
    scale = torch.diagonal(block).mean().clamp_min(torch.finfo(block.dtype).tiny)
    return block / scale + eps * torch.eye(len(block), dtype=block.dtype)


def preconditioning(G: Tensor, g: Tensor, gnb_blocks: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """Each curvature model P of one tensor's exact GGN block ``G`` (float64), with its gradient ``g``
    and GNB block estimates by name (each the mean of a few draws, what an average over refreshes
    holds; the diagonal models take the first one's diagonal, the same in expectation):
    ``efficiency`` -- the decrease of the quadratic model ``½dᵀAd − gᵀd`` (``A = G + δI``) under a line
    search along ``d = P⁻¹g``, ``(gᵀd)² / (dᵀAd · gᵀA⁻¹g)``: 1 for the exact block, SGD's ``d = g``
    for reference -- and ``condition``, the condition number of ``P⁻¹A`` (``A``'s own for SGD)."""
    n = len(g)
    eye = torch.eye(n, dtype=G.dtype)
    delta = RELATIVE_DAMPING * float(torch.diagonal(G).mean())
    A = G + delta * eye
    diag_gnb = torch.diagonal(next(iter(gnb_blocks.values())))
    models = {
        "sgd (P = I)": eye,
        "exact diagonal": torch.diag(torch.diagonal(G)) + delta * eye,
        "exact row sum |G·1|": torch.diag(G.sum(1).abs()) + delta * eye,
        "gnb diagonal": torch.diag(diag_gnb) + delta * eye,
        "gnb normalized (ε 0.3)": torch.diag(diag_gnb / diag_gnb.mean() + 0.3) if diag_gnb.mean() > 0 else eye,
        **{name: block + delta * eye for name, block in gnb_blocks.items()},
        # block_normalized's direction (its length does not enter the efficiency): the per-row block, ε 0.1 relative
        "gnb block normalized (ε 0.1)": _relative(next(reversed(gnb_blocks.values())), 0.1),
        "exact block": A,
    }
    best = float(g @ torch.linalg.solve(A, g))
    out = {}
    for name, P in models.items():
        d = torch.linalg.solve(P, g)
        efficiency = float((g @ d) ** 2 / (d @ A @ d) / best) if best > 0 else float("nan")
        # P⁻¹A is similar to the symmetric P^(-1/2) A P^(-1/2): its eigenvalues are real and positive
        values = torch.linalg.eigvals(torch.linalg.solve(P, A)).real
        out[name] = {"efficiency": efficiency, "condition": float(values.max() / values.min())}
    return out
