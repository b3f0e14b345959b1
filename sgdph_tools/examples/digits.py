"""Train the small conv-BN net on scikit-learn's digits with SGD-PH (or SGDM), on the CPU.

    python -m sgdph_tools.examples.digits --optimizer sgdph --epochs 8

A plain-PyTorch example of the optimizer's "usage B": ``optimizer.step(loss_fn=...)`` runs the
forward pass and lets the optimizer compute every gradient and Hessian-vector product it needs.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F

from .. import SGDPH, sgdph_param_groups
from ..data import digits_tensors
from ..models import small  # noqa: F401  (registers small_cnn with timm)

# Per optimizer: (lr, weight decay). SGD-PH's lr is 10x smaller than SGDM's, as in the paper's
# CIFAR runs (0.01 vs 0.1); its second-order params get lr·so_lr/(D + eps) instead.
DEFAULTS = {"sgdph": (0.01, 5e-3), "sgdm": (0.1, 5e-4)}


@dataclass
class DigitsResult:
    optimizer: str
    seed: int
    epochs: int
    test_acc: float  # percent
    final_train_loss: float
    seconds: float


def build_optimizer(name: str, model: torch.nn.Module, lr: float, weight_decay: float, **sgdph_kwargs):
    if name == "sgdph":
        return SGDPH(sgdph_param_groups(model), lr=lr, momentum=0.9, weight_decay=weight_decay, **sgdph_kwargs)
    if name == "sgdm":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; choose 'sgdph' or 'sgdm'")


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    return (model(x).argmax(1) == y).float().mean().item() * 100.0


def train_digits(
    optimizer: str = "sgdph",
    epochs: int = 8,
    seed: int = 0,
    batch_size: int = 64,
    lr: float | None = None,
    weight_decay: float | None = None,
    **sgdph_kwargs,
) -> DigitsResult:
    """Train ``small_cnn`` on the digits and return the test accuracy (cosine lr decay per step)."""
    torch.manual_seed(seed)
    x_train, y_train, x_test, y_test = digits_tensors()
    model = timm.create_model("small_cnn", num_classes=10, in_chans=1)
    default_lr, default_wd = DEFAULTS[optimizer] if optimizer in DEFAULTS else (0.1, 0.0)
    opt = build_optimizer(
        optimizer,
        model,
        lr if lr is not None else default_lr,
        weight_decay if weight_decay is not None else default_wd,
        **sgdph_kwargs,
    )
    steps_per_epoch = (len(y_train) + batch_size - 1) // batch_size
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=epochs * steps_per_epoch)
    start, loss = time.perf_counter(), torch.tensor(float("nan"))
    for _ in range(epochs):
        model.train()
        for idx in torch.randperm(len(y_train)).split(batch_size):
            xb, yb = x_train[idx], y_train[idx]
            if isinstance(opt, SGDPH):
                loss = opt.step(loss_fn=lambda: F.cross_entropy(model(xb), yb))
            else:
                opt.zero_grad(set_to_none=True)
                loss = F.cross_entropy(model(xb), yb)
                loss.backward()
                opt.step()
            sched.step()
    seconds = time.perf_counter() - start
    return DigitsResult(optimizer, seed, epochs, accuracy(model, x_test, y_test), loss.item(), seconds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--optimizer", choices=sorted(DEFAULTS), default="sgdph")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine", choices=["autograd", "finite_difference"], default="autograd")
    parser.add_argument("--estimator", choices=["rowsum", "hutchinson", "diagonal"], default="rowsum")
    args = parser.parse_args(argv)
    extra = {"engine": args.engine, "estimator": args.estimator} if args.optimizer == "sgdph" else {}
    r = train_digits(args.optimizer, args.epochs, args.seed, **extra)
    print(
        f"{r.optimizer}: test accuracy {r.test_acc:.2f}% after {r.epochs} epochs "
        f"(final train loss {r.final_train_loss:.4f}, {r.seconds:.1f} s on {torch.get_num_threads()} CPU threads)"
    )


if __name__ == "__main__":
    main()
