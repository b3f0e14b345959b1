"""Run outputs: ``metrics.jsonl`` (a header line, then one JSON line per epoch: :mod:`sgdph_tools.records`)
and ``curves.png``."""

from __future__ import annotations

from pathlib import Path

from ..records import append_jsonl, read_jsonl, rewrite_jsonl

#: Written into a run's folder when its loss became non-finite (the message inside).
DIVERGED = "diverged.txt"


def validation_rank(row: dict) -> tuple[float, float]:
    """How good an epoch is on validation, larger is better: top-1, then the lower loss -- a small
    validation set saturates (digits' reaches 100% within a few epochs), and the loss still tells
    those epochs apart. ``best.pt`` and every selection use it."""
    return row["val_acc1"], -row["val_loss"]


def append_metrics(path: Path, row: dict) -> None:
    append_jsonl(path, "metrics", row)


def read_metrics(path: Path, events: bool = False) -> list[dict]:
    """The per-epoch rows; with ``events``, only the event records instead (``{"epoch": n, "event":
    "resumed", "changes": {key: [old, new]}}``: a resume that changed hyperparameters after epoch n)."""
    return [r for r in read_jsonl(path, "metrics") if ("event" in r) == events]


def truncate_metrics(path: Path, epochs: int) -> None:
    """Keep the rows and events of the first ``epochs`` epochs (a resumed run rewrites what came after)."""
    rows = [r for r in read_jsonl(path, "metrics") if r["epoch"] <= epochs]
    rewrite_jsonl(path, "metrics", rows)


def plot_curves(rows: list[dict], path: Path, title: str) -> None:
    """Loss and top-1 per epoch (train, validation when there is one, test), as the paper's figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], label="train")
    if "val_loss" in rows[0]:
        ax_loss.plot(epochs, [r["val_loss"] for r in rows], label="validation")
    ax_loss.plot(epochs, [r["test_loss"] for r in rows], label="test")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend()
    if "val_acc1" in rows[0]:
        ax_acc.plot(epochs, [r["val_acc1"] for r in rows], label="validation top-1")
    ax_acc.plot(epochs, [r["test_acc1"] for r in rows], label="test top-1")
    ax_acc.plot(epochs, [r["train_acc1"] for r in rows], label="train top-1", alpha=0.6)
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    ax_acc.legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
