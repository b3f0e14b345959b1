"""What bounds the autograd engine: the phases of one SGD-PH rowsum step, timed apart.

    python benchmarks/autograd_phases.py --model resnet18_cifar --batch 32 --steps 8 --threads 2

Per step, on the same model and batch: the forward; a plain backward (what SGDM pays); a backward
with ``create_graph=True`` (what the double backward needs first); and the Hessian-vector product for
one 1-D tensor -- the round robin's refresh -- through that graph, for the first BatchNorm gamma (the
deepest HVP: it runs back through the whole network) and the last one (the shallowest). Medians over
``--steps``; every figure is also given as a share of SGDM's step (forward + plain backward), so
the table says what the engine's ratio to SGDM is made of.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import timm
import torch
import torch.nn.functional as F

import sgdph_tools  # noqa: F401  (registers the project's models)
from sgdph_tools import sgdph_param_groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18_cifar")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--img", type=int, default=32)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=r"Using backward\(\) with create_graph=True")
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=args.classes).train()
    x = torch.randn(args.batch, 3, args.img, args.img)
    y = torch.randint(0, args.classes, (args.batch,))
    second_order = next(g for g in sgdph_param_groups(model) if g["second_order"])["params"]
    params = list(model.parameters())
    first, last = second_order[0], second_order[-1]

    times: dict[str, list[float]] = {
        k: [] for k in ("forward", "backward", "backward, create_graph", "HVP first 1-D tensor", "HVP last 1-D tensor")
    }
    for _ in range(args.steps + 1):  # the first is a warm-up
        start = time.perf_counter()
        loss = F.cross_entropy(model(x), y)
        t_forward = time.perf_counter() - start
        start = time.perf_counter()
        torch.autograd.grad(loss, params)
        t_backward = time.perf_counter() - start

        loss = F.cross_entropy(model(x), y)
        start = time.perf_counter()
        grads = torch.autograd.grad(loss, params, create_graph=True)
        t_create = time.perf_counter() - start
        index = {id(p): i for i, p in enumerate(params)}
        hvp = {}
        for name, p in (("HVP first 1-D tensor", first), ("HVP last 1-D tensor", last)):
            g = grads[index[id(p)]]
            start = time.perf_counter()
            torch.autograd.grad(g, p, torch.ones_like(p), retain_graph=True)
            hvp[name] = time.perf_counter() - start
        del grads, loss
        if _ == 0:
            continue
        times["forward"].append(t_forward)
        times["backward"].append(t_backward)
        times["backward, create_graph"].append(t_create)
        for name, t in hvp.items():
            times[name].append(t)

    # The round robin refreshes each second-order tensor in turn: the engine's average step pays the
    # mean HVP over all of them (once each, on one graph).
    loss = F.cross_entropy(model(x), y)
    grads = dict(zip(map(id, params), torch.autograd.grad(loss, params, create_graph=True)))
    cycle = []
    for p in second_order:
        start = time.perf_counter()
        torch.autograd.grad(grads[id(p)], p, torch.ones_like(p), retain_graph=True)
        cycle.append(time.perf_counter() - start)
    times["HVP, mean over the round robin"] = [statistics.mean(cycle)]
    medians = {k: statistics.median(v) * 1000 for k, v in times.items()}
    sgdm = medians["forward"] + medians["backward"]
    print(
        f"{args.model}, batch {args.batch} of {args.img}x{args.img}, {args.classes} classes, "
        f"{args.threads} threads, torch {torch.__version__}; medians of {args.steps} steps"
    )
    print("| phase | ms | / SGDM's step (forward + backward) |")
    print("|---|---|---|")
    for name, ms in medians.items():
        print(f"| {name} | {ms:.0f} | {ms / sgdm:.2f} |")
    refreshes = (
        ("HVP first 1-D tensor", "the first tensor"),
        ("HVP last 1-D tensor", "the last tensor"),
        ("HVP, mean over the round robin", f"each of the {len(second_order)} tensors in turn (mean)"),
    )
    for name, what in refreshes:
        step = medians["forward"] + medians["backward, create_graph"] + medians[name]
        print(
            f"| SGD-PH step refreshing {what}: forward + create_graph backward + HVP | {step:.0f} | {step / sgdm:.2f} |"
        )


if __name__ == "__main__":
    main()
