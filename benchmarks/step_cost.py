"""Per-step cost of SGD-PH's variants, as ratios to SGDM's step measured in the same run.

    python benchmarks/step_cost.py --model resnet18 --batch 32 --img 32 --classes 100 --steps 10 --rounds 3

Each round times every configuration for ``--steps`` steps (after one warm-up step), configurations
interleaved so machine noise spreads over all of them; the table reports the median over rounds of
(time per step) / (SGDM's time per step in that round), and peak memory where CUDA is used.
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import timm
import torch
import torch.nn.functional as F
from timm.optim import Adahessian

from sgdph_tools import SGDPH, sgdph_param_groups

CONFIGS = {
    "SGDM": None,
    "SGD-PH rowsum, autograd, usage A (backward(create_graph=True))": dict(usage="A"),
    "SGD-PH rowsum, autograd, usage B (step(loss_fn))": dict(usage="B"),
    "SGD-PH rowsum, finite difference": dict(usage="B", engine="finite_difference"),
    "SGD-PH hutchinson, autograd": dict(usage="B", estimator="hutchinson"),
    "SGD-PH hutchinson, finite difference": dict(usage="B", estimator="hutchinson", engine="finite_difference"),
    "AdaHessian (timm), HVP over all params": "adahessian",
}


def make_step(name, cfg, model, x, y):
    loss_fn = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    if cfg is None:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)

        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn().backward()
            opt.step()
    elif cfg == "adahessian":
        opt = Adahessian(model.parameters(), lr=1e-3)

        def step():
            opt.zero_grad(set_to_none=True)
            loss_fn().backward(create_graph=True)
            opt.step()
    else:
        cfg = dict(cfg)
        usage = cfg.pop("usage")
        opt = SGDPH(sgdph_param_groups(model), lr=1e-3, **cfg)
        if usage == "A":

            def step():
                opt.zero_grad(set_to_none=True)
                loss_fn().backward(create_graph=True)
                opt.step()
        else:

            def step():
                opt.step(loss_fn=loss_fn)

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--img", type=int, default=32)
    parser.add_argument("--classes", type=int, default=100)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
    device = torch.device(args.device)
    torch.manual_seed(0)
    x = torch.randn(args.batch, 3, args.img, args.img, device=device)
    y = torch.randint(0, args.classes, (args.batch,), device=device)
    ratios: dict[str, list[float]] = {name: [] for name in CONFIGS}
    memory: dict[str, float] = {}
    for _ in range(args.rounds):
        times = {}
        for name, cfg in CONFIGS.items():
            model = timm.create_model(args.model, num_classes=args.classes).to(device)
            step = make_step(name, cfg, model, x, y)
            step()  # warm-up (allocations, first refresh)
            if device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for _ in range(args.steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize()
                memory[name] = torch.cuda.max_memory_allocated() / 2**20
            times[name] = (time.perf_counter() - start) / args.steps
        for name in CONFIGS:
            ratios[name].append(times[name] / times["SGDM"])
        base = times["SGDM"]
    where = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"{args.model}, {args.classes} classes, batch {args.batch} of {args.img}x{args.img}, {where}, "
        f"torch {torch.__version__}; SGDM step in the last round: {base * 1000:.0f} ms\n"
    )
    head = "| configuration | time per step / SGDM (median of rounds) | all rounds |"
    print(head + (" peak memory / SGDM |" if memory else ""))
    print("|---|---|---|" + ("---|" if memory else ""))
    for name, r in ratios.items():
        mem = f" {memory[name] / memory['SGDM']:.2f} |" if memory else ""
        print(f"| {name} | {statistics.median(r):.2f} | {' '.join(f'{v:.2f}' for v in r)} |{mem}")


if __name__ == "__main__":
    main()
