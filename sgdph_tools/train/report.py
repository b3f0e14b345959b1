"""Comparing runs: final and best accuracy per run, and mean ± std over runs that differ only by
their seed (the paper's table format)."""
from __future__ import annotations

import json
import statistics
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..errors import UserError
from .metrics import read_metrics

# What may differ between runs that count as repeats of one experiment.
_SEED_ONLY = {"seed", "name", "output_dir", "progress", "log_every"}


@dataclass
class Run:
    path: Path
    recipe: dict
    rows: list[dict]

    @property
    def final(self) -> dict:
        return self.rows[-1]

    @property
    def best_acc1(self) -> float:
        return max(r["test_acc1"] for r in self.rows)

    @property
    def label(self) -> str:
        r = self.recipe
        return f"{r['model']['name']}{'+WN' if r['model']['conversion']['wn'] else ''} {r['optimizer']['name']} {r['data']['name']}"

    def experiment_key(self) -> str:
        """The recipe without seed, name and output folder: equal keys are repeats."""
        recipe = {k: (dict(v) if isinstance(v, dict) else v) for k, v in self.recipe.items()}
        recipe["trainer"] = {k: v for k, v in recipe["trainer"].items() if k not in _SEED_ONLY}
        return json.dumps(recipe, sort_keys=True)


def load_run(path: Path) -> Run:
    recipe_file, metrics_file = path / "recipe.yaml", path / "metrics.jsonl"
    if not recipe_file.is_file() or not metrics_file.is_file():
        raise UserError(f"{path} is not a run folder: it needs recipe.yaml and metrics.jsonl (written by sgdph train)")
    rows = read_metrics(metrics_file)
    if not rows:
        raise UserError(f"{path} has no finished epoch yet")
    return Run(path, yaml.safe_load(recipe_file.read_text()), rows)


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def summarize(runs: list[Run]) -> tuple[list[dict], list[dict]]:
    """Per-run rows, and per-experiment rows (runs grouped by everything but the seed)."""
    per_run = [{
        "run": str(run.path), "experiment": run.label, "seed": run.recipe["trainer"]["seed"],
        "epochs": run.final["epoch"], "final_acc1": run.final["test_acc1"], "best_acc1": run.best_acc1,
        "final_acc5": run.final["test_acc5"], "final_train_loss": run.final["train_loss"],
    } for run in runs]
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.experiment_key(), []).append(run)
    per_experiment = [{
        "experiment": members[0].label, "runs": len(members),
        "seeds": [m.recipe["trainer"]["seed"] for m in members],
        "final_acc1": mean_std([m.final["test_acc1"] for m in members]),
        "best_acc1": mean_std([m.best_acc1 for m in members]),
    } for members in groups.values()]
    return per_run, per_experiment


def plot_comparison(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        epochs = [r["epoch"] for r in run.rows]
        label = f"{run.label} s{run.recipe['trainer']['seed']}"
        ax_acc.plot(epochs, [r["test_acc1"] for r in run.rows], label=label)
        ax_loss.plot(epochs, [r["train_loss"] for r in run.rows], label=label)
    ax_acc.set(xlabel="epoch", ylabel="test top-1 (%)", title="test accuracy")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="training loss", yscale="log")
    ax_acc.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
