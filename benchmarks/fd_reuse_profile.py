"""What reusing the activations below the perturbed layer saves, tensor by tensor.

    python benchmarks/fd_reuse_profile.py [--model resnet18_cifar] [--batch 64] [--every 4] [--threads 2]

For every ``--every``-th second-order tensor of the model (in the round robin's order, input side
first): the time of one finite-difference product ``H·1`` for that tensor -- the perturbed forward and
the backward to the tensor -- with the full forward and with the activations below the tensor's
layer reused (``sgdph_tools/curvature/activation_reuse.py``), back to back, and whether the two results are
identical bit for bit. ``docs/benchmarks.md`` quotes it.
"""

from __future__ import annotations

import argparse
import time

import timm
import torch
import torch.nn.functional as F

import sgdph_tools  # noqa: F401  (registers the project's models)
from sgdph_tools.curvature import FiniteDifferenceHVP, ForwardReplay
from sgdph_tools.curvature.activation_reuse import ActivationReuse
from sgdph_tools.optim import sgdph_param_groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18_cifar")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--img-size", type=int, default=32)
    parser.add_argument("--every", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = timm.create_model(args.model, num_classes=100).train()
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    y = torch.randint(0, 100, (args.batch,))
    names = {id(p): n for n, p in model.named_parameters()}
    tensors = [p for g in sgdph_param_groups(model) if g["second_order"] for p in g["params"]]
    reuse = ActivationReuse(model)

    def product(target, with_reuse: bool):
        replay = ForwardReplay(lambda: F.cross_entropy(model(x), y), buffers=list(model.buffers()))
        replay.cut = reuse.for_target(target) if with_reuse else None
        (g0,) = torch.autograd.grad(replay.first(), [target])
        start = time.perf_counter()
        (hv,) = FiniteDifferenceHVP(replay, [target], [g0])({0: torch.ones_like(target)}, [0])
        return hv, time.perf_counter() - start, replay.cut

    print(f"{args.model}, batch {args.batch}, {args.threads} threads, torch {torch.__version__}\n")
    print("| tensor | position | full forward, s | reused below, s | reused / full | outputs handed back | identical |")
    print("|---|---|---|---|---|---|---|")
    totals = [0.0, 0.0]
    for i in range(0, len(tensors), args.every):
        target = tensors[i]
        product(target, True)  # once before timing: the graph below the tensor is walked the first time
        full, t_full, _ = product(target, False)
        reused, t_reused, cut = product(target, True)
        totals[0] += t_full
        totals[1] += t_reused
        print(
            f"| {names[id(target)]} | {i + 1}/{len(tensors)} | {t_full:.3f} | {t_reused:.3f} | "
            f"{t_reused / t_full:.2f} | {cut.handed_back} | {torch.equal(full, reused)} |"
        )
    print(f"| **sum** | | {totals[0]:.3f} | {totals[1]:.3f} | {totals[1] / totals[0]:.2f} | | |")


if __name__ == "__main__":
    main()
