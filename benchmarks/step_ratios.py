"""What SGD-PH's rule did to each second-order tensor: the step relative to SGD's, read from trained runs.

    python benchmarks/step_ratios.py RUN_DIR [RUN_DIR ...]

For every run (an ``sgdph train`` folder with ``last.pt``), the optimizer state holds each
second-order tensor's Hessian EMA ``D`` and refresh count ``n``; the rule of the run turns them into
``r`` -- the multiplier on the momentum buffer, relative to SGD's step (1 = SGD). Printed per tensor:
the median and the 10th/90th percentiles of ``r`` over its elements, at the end of training. This is
the mechanism behind docs/evidence.md: whether the rule under-steps or over-steps a tensor.

Under ``rule: block_newton`` a tensor with a whole curvature block has no elementwise r: its step is
``τ·(Ĝ + εI)⁻¹ m``. Printed instead: the step's norm relative to SGD's (``|τ·d| / |m|``), the cosine
between the two directions, and the condition number of ``Ĝ + εI``.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from sgdph_tools.optim.functional import step_denominators


def ratios(run: Path) -> list[tuple[str, float, float, float]]:
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["optimizer"]
    out = []
    for group in state["param_groups"]:
        if not group.get("second_order"):
            continue
        names = group.get("param_names") or [str(i) for i in group["params"]]
        for name, index in zip(names, group["params"]):
            s = state["state"].get(index)
            if not s or not s["hessian_refreshes"] or "hessian_block" in s:
                continue
            c = 1 - group["hessian_momentum"] ** s["hessian_refreshes"]
            denoms, numerator = step_denominators(
                [s["hessian_ema"].double()],
                [c],
                so_lr=group["so_lr"],
                eps=group["eps"],
                eps_in_correction=group["authors_code"],
                rule=group.get("rule", "paper"),
            )
            r = (numerator / denoms[0]).flatten()
            q = torch.quantile(r, torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)).tolist()
            out.append((name, *q))
    return out


def block_ratios(run: Path) -> list[tuple[str, float, float, float]]:
    """Per block_newton tensor with a whole block: (name, |τ·d| / |m|, cos(d, m), cond(Ĝ + εI))."""
    state = torch.load(run / "last.pt", map_location="cpu", weights_only=True)["optimizer"]
    out = []
    for group in state["param_groups"]:
        names = group.get("param_names") or [str(i) for i in group["params"]]
        for name, index in zip(names, group["params"]):
            s = state["state"].get(index)
            if not s or "hessian_block" not in s or not s["hessian_refreshes"] or "momentum_buffer" not in s:
                continue
            block = s["hessian_block"].double() / (1 - group["hessian_momentum"] ** s["hessian_refreshes"])
            normalized = group.get("rule") == "block_normalized"  # ε relative, SGD's length
            if normalized:
                block = block / block.diagonal().mean()
            damped = block + group["eps"] * torch.eye(len(block), dtype=block.dtype)
            m = s["momentum_buffer"].double().reshape(-1)
            d = torch.linalg.solve(damped, m)
            values = torch.linalg.eigvalsh(damped)
            ratio = 1.0 if normalized else float(group["so_lr"] * d.norm() / m.norm())
            cosine = float(d @ m / (d.norm() * m.norm()))
            out.append((name, ratio, cosine, float(values.max() / values.min())))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path)
    args = parser.parse_args()
    for run in args.runs:
        rows = ratios(run)
        print(f"\n{run}")
        print(f"  {'tensor':32s} {'p10':>9s} {'median':>9s} {'p90':>9s}")
        for name, p10, median, p90 in rows:
            print(f"  {name:32s} {p10:9.3g} {median:9.3g} {p90:9.3g}")
        if rows:
            print(f"  median over tensors of the median r: {statistics.median(r[2] for r in rows):.3g}")
        blocks = block_ratios(run)
        if blocks:
            print(f"  {'tensor (block_newton)':32s} {'|step|/SGD':>10s} {'cos':>6s} {'cond':>9s}")
            for name, ratio, cosine, cond in blocks:
                print(f"  {name:32s} {ratio:10.3g} {cosine:6.2f} {cond:9.3g}")


if __name__ == "__main__":
    main()
