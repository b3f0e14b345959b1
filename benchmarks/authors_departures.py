"""How much each departure of the default SGD-PH rule from the authors' released code changes training.

    python benchmarks/authors_departures.py [--steps 40] [--seeds 3]

``small_cnn`` (conv-BN-ReLU) on scikit-learn's digits, float64, batch 64, the paper's CIFAR settings
(lr 0.01, momentum 0.9, weight decay 5e-3, τ 1e-3, ε 1e-4), plain ``model.parameters()`` (so both
rules choose the same second-order tensors: the 1-D ones except the classifier bias).

A rule here is four switches, each the authors' way or the default way:
  eps        ε inside the bias correction, (D + ε)/c  |  after it, D/c + ε
  correction c = 1 − β^(⌊t/M⌋+1), one for all tensors  |  c = 1 − αⁿ, n = the tensor's refreshes
  period     round robin over all M 1-D tensors (the last one's turn refreshes nothing)  |  over the
             M − 1 second-order tensors
  first      before a tensor's first refresh τ·c·buf/ε  |  an SGD step
The script first checks that the all-default and all-authors switch settings reproduce
``SGDPH(...)`` and ``SGDPH(..., authors_code=True)`` to 1e-10, then flips one switch at a time.
Reported after the given steps, mean over seeds: ‖θ_rule − θ_default‖ / ‖θ_default − θ_0‖ (the
difference relative to how far training moved the parameters), over all parameters and over the
second-order (1-D) ones alone.
"""

from __future__ import annotations

import argparse

import timm
import torch
import torch.nn.functional as F

import sgdph_tools  # noqa: F401  (registers small_cnn)
from sgdph_tools import SGDPH
from sgdph_tools.data.digits import digits_tensors

HYPER = dict(lr=0.01, momentum=0.9, weight_decay=5e-3, so_lr=1e-3, eps=1e-4)
DEFAULT = dict(eps="default", correction="default", period="default", first="default")
AUTHORS = dict(eps="authors", correction="authors", period="authors", first="authors")


def batches(seed: int, steps: int, batch: int = 64):
    x, y, _, _ = digits_tensors()
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=g)
        yield x[idx].double(), y[idx]


def fresh_model(seed: int):
    torch.manual_seed(seed)
    return timm.create_model("small_cnn", num_classes=10, in_chans=1).double().train()


def run_switches(seed: int, steps: int, rule: dict) -> torch.Tensor:
    """The update written out with the four switches (independent of sgdph_tools.optim)."""
    model = fresh_model(seed)
    params = list(model.parameters())
    one_d = [p for p in params if p.ndim == 1]
    second = one_d[:-1]
    period = len(one_d) if rule["period"] == "authors" else len(second)
    beta, tau, eps, lr, wd = HYPER["momentum"], HYPER["so_lr"], HYPER["eps"], HYPER["lr"], HYPER["weight_decay"]
    buf = {id(p): None for p in params}
    D = {id(p): torch.zeros_like(p) for p in second}
    n = {id(p): 0 for p in second}
    for t, (x, y) in enumerate(batches(seed, steps), start=1):
        grads = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
        k = (t - 1) % period
        target = (one_d if rule["period"] == "authors" else second)[k]
        h = None
        if any(target is p for p in second):
            g_t = grads[next(i for i, p in enumerate(params) if p is target)]
            h = torch.autograd.grad(g_t, target, torch.ones_like(target))[0].abs()
        with torch.no_grad():
            for p, g in zip(params, grads):
                g = g.detach()
                second_order = any(p is q for q in second)
                if not second_order:
                    g = g + wd * p
                buf[id(p)] = g.clone() if buf[id(p)] is None else beta * buf[id(p)] + g
                if not second_order:
                    p -= lr * buf[id(p)]
                    continue
                if target is p and h is not None:
                    D[id(p)] = beta * D[id(p)] + (1 - beta) * h
                    n[id(p)] += 1
                authors_c = 1 - beta ** (t // len(one_d) + 1)
                c = authors_c if rule["correction"] == "authors" else 1 - beta ** n[id(p)]
                if n[id(p)] == 0:  # no curvature yet
                    step = buf[id(p)] if rule["first"] == "default" else tau * authors_c * buf[id(p)] / eps
                elif rule["eps"] == "authors":
                    step = tau * buf[id(p)] / ((D[id(p)] + eps) / c)
                else:
                    step = tau * buf[id(p)] / (D[id(p)] / c + eps)
                p -= lr * (step + wd * p)
    return flat(model)


def flat(model) -> tuple[torch.Tensor, torch.Tensor]:
    """All parameters, and the 1-D ones except the last (the second-order ones), flattened."""
    params = list(model.parameters())
    second = [p for p in params if p.ndim == 1][:-1]
    return (torch.cat([p.detach().reshape(-1) for p in params]), torch.cat([p.detach().reshape(-1) for p in second]))


def run_optimizer(seed: int, steps: int, authors_code: bool) -> torch.Tensor:
    model = fresh_model(seed)
    opt = SGDPH(model.parameters(), authors_code=authors_code, **HYPER)
    for x, y in batches(seed, steps):
        opt.step(loss_fn=lambda: F.cross_entropy(model(x), y))
    return flat(model)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = {"all four (= authors_code=True)": AUTHORS}
    rows.update({f"{k} only": dict(DEFAULT, **{k: "authors"}) for k in DEFAULT})
    results = {name: ([], []) for name in rows}
    for seed in range(args.seeds):
        start = flat(fresh_model(seed))
        default = run_switches(seed, args.steps, DEFAULT)
        for rule, authors in ((DEFAULT, False), (AUTHORS, True)):
            err = (run_switches(seed, args.steps, rule)[0] - run_optimizer(seed, args.steps, authors)[0]).abs().max()
            assert err < 1e-10, f"the switch reference does not reproduce SGDPH(authors_code={authors}): {err:.2e}"
        for name, rule in rows.items():
            other = run_switches(seed, args.steps, rule) if rule != DEFAULT else default
            for i in range(2):
                results[name][i].append(((other[i] - default[i]).norm() / (default[i] - start[i]).norm()).item())
    print(f"small_cnn on digits, float64, {args.steps} steps, {args.seeds} seeds; ‖θ − θ_default‖ / ‖θ_default − θ_0‖")
    print("| the authors' way for | all parameters (mean; per seed) | 1-D second-order parameters (mean; per seed) |")
    print("|---|---|---|")
    for name, (every, one_d) in results.items():
        cells = [f"{sum(v) / len(v):.1%}; {' '.join(f'{x:.1%}' for x in v)}" for v in (every, one_d)]
        print(f"| {name} | {cells[0]} | {cells[1]} |")


if __name__ == "__main__":
    main()
