"""Measure what the partial-Hessian estimators really estimate.

    python benchmarks/hessian_structure.py            # prints a markdown report

1. Exact Hessian blocks (float64, torch.autograd.functional.hessian) of the channel-wise 1-D
   tensors of a small conv-BN-ReLU net: how far from diagonal each block is, and how the row sum
   H·1 (the paper's quantity) compares with the true diagonal.
2. The finite-difference engine against the autograd engine in float32, for ReLU and GELU nets
   (timm resnet18 at 32x32 and the small conv-BN net): cosine similarity and relative error.
"""

from __future__ import annotations

import argparse

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

from sgdph_tools import partial_hessian


def small_net(act=nn.ReLU) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        act(),
        nn.Conv2d(8, 16, 3, padding=1, bias=False),
        nn.BatchNorm2d(16),
        act(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, 10),
    )


def block_structure(seeds: int) -> list[str]:
    rows = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        net = small_net().double()
        x, y = torch.randn(32, 3, 8, 8, dtype=torch.float64), torch.randint(0, 10, (32,))
        named = [(n, p) for n, p in net.named_parameters() if p.ndim == 1][:-1]
        names, params = zip(*named)

        def loss_of(*values):
            return F.cross_entropy(functional_call(net, dict(zip(names, values)), (x,)), y)

        H = torch.autograd.functional.hessian(loss_of, tuple(p.detach() for p in params))
        for i, name in enumerate(names):
            block = H[i][i]
            diag = block.diagonal()
            off = block - torch.diag(diag)
            rowsum = block.sum(1)
            ratio = (off.norm() / diag.norm()).item()
            cos = F.cosine_similarity(rowsum, diag, 0).item()
            sign = (torch.sign(rowsum) != torch.sign(diag)).float().mean().item() * 100
            abs_err = ((rowsum.abs() - diag.abs()).norm() / diag.abs().norm()).item()
            rows.append(
                f"| {seed} | `{name}` ({block.shape[0]}) | {ratio:.2f} | {cos:.3f} | {sign:.0f}% | {abs_err:.2f} |"
            )
    return rows


def engine_agreement(seeds: int) -> list[str]:
    rows = []
    cases = [
        ("timm resnet18, ReLU", lambda: timm.create_model("resnet18", num_classes=10), (32, 3, 32, 32)),
        (
            "timm resnet18, GELU",
            lambda: timm.create_model("resnet18", num_classes=10, act_layer="gelu"),
            (32, 3, 32, 32),
        ),
        ("small conv-BN, ReLU", lambda: small_net(nn.ReLU), (32, 3, 8, 8)),
        ("small conv-BN, GELU", lambda: small_net(nn.GELU), (32, 3, 8, 8)),
    ]
    for label, build, shape in cases:
        for estimator in ("rowsum", "hutchinson"):
            cos, err = [], []
            for seed in range(seeds):
                torch.manual_seed(seed)
                net = build()
                x, y = torch.randn(shape), torch.randint(0, 10, (shape[0],))
                params = [p for p in net.parameters() if p.ndim == 1][:-1]
                if estimator == "rowsum":  # a few tensors are enough, one HVP each
                    params = params[:6]
                loss_fn = lambda: F.cross_entropy(net(x), y)  # noqa: E731
                a = partial_hessian(
                    loss_fn, params, estimator, "autograd", generator=torch.Generator().manual_seed(seed)
                )
                b = partial_hessian(
                    loss_fn, params, estimator, "finite_difference", generator=torch.Generator().manual_seed(seed)
                )
                a, b = torch.cat([t.flatten() for t in a]), torch.cat([t.flatten() for t in b])
                cos.append(F.cosine_similarity(a, b, 0).item())
                err.append(((a - b).norm() / a.norm()).item())
            rows.append(
                f"| {label} | {estimator} | {min(cos):.4f} .. {max(cos):.4f} | {min(err):.1e} .. {max(err):.1e} |"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(2)
    print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} CPU threads\n")
    print("### Exact blocks (float64): small conv-BN-ReLU net, batch 32 of 3x8x8, 10 classes\n")
    print(
        "| seed | tensor (size) | off-diag / diag (Frobenius) | cos(H·1, diag) | sign(H·1) ≠ sign(diag) "
        "| ‖ abs(H·1) − abs(diag) ‖ / ‖diag‖ |"
    )
    print("|---|---|---|---|---|---|")
    print("\n".join(block_structure(args.seeds)))
    print("\n### Finite differences vs autograd (float32), over seeds: min .. max\n")
    print("| network | estimator | cosine | relative error |")
    print("|---|---|---|---|")
    print("\n".join(engine_agreement(args.seeds)))


if __name__ == "__main__":
    main()
