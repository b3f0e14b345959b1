"""An idea for GNB on the step's logits, measured: the true gradient and the sampled-label gradient in
one batched backward (``torch.autograd.grad(logits, params, stacked residuals, is_grads_batched=True)``:
vmap over the backward) instead of the step's backward and a second one to the 1-D tensors. Checks
that both give the same gradients, then counts top-level aten operators (on a GPU each is at least a
launch) and times each form on the CPU (median of 5), beside a plain forward + backward.

    python benchmarks/gnb_batched_backward.py [--model resnet18_cifar] [--batch 32]
"""

from __future__ import annotations

import argparse
import time

import timm
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import sgdph_tools  # noqa: F401  (registers the project's models)
from sgdph_tools.curvature.gauss_newton import sampled_labels


def top_level_ops(fn) -> int:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return sum(
        e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
        for e in prof.events()
    )


def median_ms(fn, repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return sorted(times)[repeats // 2] * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18_cifar")
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=10)
    params = list(model.parameters())
    one_d = [i for i, p in enumerate(params) if p.ndim == 1]
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))

    def plain():
        torch.autograd.grad(F.cross_entropy(model(x), y), params)

    def two_backwards():  # what SGD-PH does: the step's backward, then one to the 1-D tensors
        logits = model(x)
        grads = torch.autograd.grad(F.cross_entropy(logits, y), params, retain_graph=True)
        labels, _ = sampled_labels(logits, torch.Generator().manual_seed(1))
        sampled = torch.autograd.grad(F.cross_entropy(logits, labels), [params[i] for i in one_d])
        return grads, sampled

    def batched():
        logits = model(x)
        labels, _ = sampled_labels(logits, torch.Generator().manual_seed(1))
        probs = torch.softmax(logits.detach(), 1)
        residuals = torch.stack([probs - F.one_hot(t, logits.shape[1]) for t in (y, labels)]) / len(y)
        both = torch.autograd.grad(logits, params, residuals, is_grads_batched=True)
        return [g[0] for g in both], [both[i][1] for i in one_d]

    (g1, s1), (g2, s2) = two_backwards(), batched()
    gap = max((a - b).abs().max().item() for a, b in zip([*g1, *s1], [*g2, *s2]))
    print(f"{args.model}, batch {args.batch}: largest difference between the two forms {gap:.1e}")
    print(
        "top-level operators: " + ", ".join(f"{n} {top_level_ops(f)}" for n, f in forms(plain, two_backwards, batched))
    )
    for _ in range(2):
        print("CPU ms: " + ", ".join(f"{n} {median_ms(f):.0f}" for n, f in forms(plain, two_backwards, batched)))


def forms(plain, two_backwards, batched):
    return [("forward + backward", plain), ("two backwards (now)", two_backwards), ("one batched backward", batched)]


if __name__ == "__main__":
    main()
