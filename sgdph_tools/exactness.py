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
) -> dict:
    """Block structure and every estimate's agreement with its exact target, per tensor in ``names``."""
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
    return {"dtype": str(dtype).removeprefix("torch."), "blocks": blocks, "estimates": rows_out}
