"""Run outputs: ``metrics.jsonl`` (one JSON line per epoch) and ``curves.png``."""
from __future__ import annotations

import json
from pathlib import Path


def append_metrics(path: Path, row: dict) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(row) + "\n")


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(path: Path, epochs: int) -> None:
    """Keep the rows of the first ``epochs`` epochs (a resumed run rewrites what came after)."""
    rows = [r for r in read_metrics(path) if r["epoch"] <= epochs]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def plot_curves(rows: list[dict], path: Path, title: str) -> None:
    """Train loss and test accuracy per epoch, as the paper's figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], label="train")
    ax_loss.plot(epochs, [r["test_loss"] for r in rows], label="test")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    ax_acc.plot(epochs, [r["test_acc1"] for r in rows], label="test top-1")
    ax_acc.plot(epochs, [r["train_acc1"] for r in rows], label="train top-1", alpha=0.6)
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    ax_acc.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
