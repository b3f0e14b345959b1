"""SGD-PH against SGDM on scikit-learn's digits: same network, same epochs, several seeds.

    python benchmarks/digits_compare.py --seeds 5 --epochs 8

Prints a markdown table of test accuracy (mean ± std over seeds) and time per run. Each optimizer
uses the lr / weight decay of the paper's CIFAR setting (SGDM 0.1 / 5e-4, SGD-PH 0.01 / 5e-3),
cosine decay, batch 64. The runs of different optimizers are interleaved seed by seed, so that a
slow moment of this noisy machine does not land on one optimizer only.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from sgdph_tools.examples.digits import train_digits

CONFIGS = {
    "SGDM": dict(optimizer="sgdm"),
    "SGD-PH (rowsum, autograd)": dict(optimizer="sgdph"),
    "SGD-PH (hutchinson, autograd)": dict(optimizer="sgdph", estimator="hutchinson"),
    "SGD-PH (rowsum, finite difference)": dict(optimizer="sgdph", engine="finite_difference"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(2)
    results: dict[str, list] = {name: [] for name in CONFIGS}
    for seed in range(args.seeds):
        for name, cfg in CONFIGS.items():
            results[name].append(train_digits(epochs=args.epochs, seed=seed, **cfg))
    print(
        f"digits, small_cnn, {args.epochs} epochs, seeds 0..{args.seeds - 1}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} CPU threads\n"
    )
    print("| optimizer | test accuracy % (mean ± std) | per seed | seconds per run (mean) |")
    print("|---|---|---|---|")
    for name, runs in results.items():
        accs = [r.test_acc for r in runs]
        secs = statistics.mean(r.seconds for r in runs)
        per_seed = " ".join(f"{a:.2f}" for a in accs)
        print(f"| {name} | {statistics.mean(accs):.2f} ± {statistics.stdev(accs):.2f} | {per_seed} | {secs:.2f} |")


if __name__ == "__main__":
    main()
