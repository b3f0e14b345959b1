"""How many operators a refreshing SGD-PH step dispatches beyond the forward and backward it needs
anyway: on a GPU each is (at least) a kernel launch, and at the paper's batch size the GPU step is
host-bound, so this count is what the refresh costs there. Counted on the CPU with torch's profiler
(top-level aten operators: those not called from inside another aten operator).

    python benchmarks/refresh_ops.py [--model resnet18_cifar] [--batch 16] [--every 1]

With ``--every k`` > 1 (refreshing every k steps) the step after a refresh is counted too: it refreshes
nothing, but it is where a divisor cached between refreshes would be rebuilt.

The recipes' default mode: GNB from its own forward on a quarter of the batch, the ``normalized``
rule, weight decay, ``step(loss_fn=...)``.
"""

from __future__ import annotations

import argparse
import collections

import timm
import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile

import sgdph_tools  # noqa: F401  (registers the project's models)
from sgdph_tools import SGDPH, sgdph_param_groups


def top_level_ops(fn) -> collections.Counter:
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return collections.Counter(
        e.name
        for e in prof.events()
        if e.name.startswith("aten::") and (e.cpu_parent is None or not e.cpu_parent.name.startswith("aten::"))
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18_cifar")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--every", type=int, default=1, help="hessian_every")
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=10)
    x, y = torch.randn(args.batch, 3, 32, 32), torch.randint(0, 10, (args.batch,))
    opt = SGDPH(
        sgdph_param_groups(model),
        lr=0.01,
        weight_decay=5e-4,
        estimator="gnb",
        gnb_fraction=0.25,
        model=model,
        hessian_every=args.every,
    )

    def loss_and_logits():
        logits = model(x)
        return F.cross_entropy(logits, y), logits

    def forward_backward():
        model.zero_grad()
        loss_and_logits()[0].backward()

    while True:  # to the step before a refresh, past the first cycle
        opt.step(loss_fn=loss_and_logits)
        if opt._steps_taken() >= 3 and opt._steps_taken() % args.every == 0:
            break
    base = top_level_ops(forward_backward)
    step = top_level_ops(lambda: opt.step(loss_fn=loss_and_logits))
    after = top_level_ops(lambda: opt.step(loss_fn=loss_and_logits)) if args.every > 1 else None
    print(f"{args.model}: forward + backward {sum(base.values())} operators; a refreshing step {sum(step.values())}")
    for name, count in (step - base).most_common(12):
        print(f"  {name}: +{count}")
    if after is not None:
        print(f"the step after it (refreshes nothing): {sum(after.values())} operators")
        for name, count in (after - base).most_common(6):
            print(f"  {name}: +{count}")


if __name__ == "__main__":
    main()
