"""Comparing runs: test accuracy per run, mean ± std over runs that differ only by their seed (the
paper's table format), and the best configuration per contender of a grid.

Nothing is selected on the test set. A run's "selected" epoch is the one with the best validation
score (what ``best.pt`` holds), and the test accuracy reported for it is that epoch's. Runs without a
validation set report their last epoch and cannot take part in a selection. A diverged run (its loss
became non-finite: ``diverged.txt`` in its folder) is counted, not dropped: it scores 0% (or an
infinite loss) on validation and test, so a configuration that diverges for some seeds pays for it.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from ..errors import UserError
from ..recipe import applicable_settings, with_defaults
from .metrics import DIVERGED, read_metrics, validation_rank

# What may differ between runs that count as repeats of one experiment.
_SEED_ONLY = {"seed", "name", "output_dir", "progress", "log_every", "threads"}

#: ``--by`` choices: the metrics key, whether larger is better, and how a run's epochs rank (larger
#: is better; top-1 ties go to the lower loss, as for best.pt).
SELECTION = {
    "val_top1": ("val_acc1", True, validation_rank),
    "val_loss": ("val_loss", False, lambda row: -row["val_loss"]),
}


@dataclass
class Run:
    path: Path
    recipe: dict
    rows: list[dict]
    diverged: bool = False

    @property
    def final(self) -> dict | None:
        return self.rows[-1] if self.rows else None

    @property
    def unfinished(self) -> bool:
        """Stopped before its recipe's last epoch (interrupted, or still running), and not diverged."""
        planned = self.recipe.get("trainer", {}).get("epochs")
        return not self.diverged and planned is not None and (self.final or {}).get("epoch", 0) < planned

    def selected(self, by: str = "val_top1") -> dict | None:
        """The epoch with the best validation score (what best.pt holds for val_top1), or None
        without validation."""
        scored = [r for r in self.rows if "val_acc1" in r]
        return max(scored, key=SELECTION[by][2]) if scored else None

    @property
    def seed(self) -> int:
        return self.recipe["trainer"]["seed"]

    @property
    def label(self) -> str:
        r = self.recipe
        wn = "+WN" if r["model"]["conversion"]["wn"] else ""
        return f"{r['model']['name']}{wn} {r['optimizer']['name']} {r['data']['name']}"

    @property
    def contender(self) -> str:
        """What competes in a selection: the optimizer; for SGD-PH each estimator (with its engine
        where that is not autograd's exact products) and each update rule (the authors' code is one)."""
        o = self.recipe["optimizer"]
        if o["name"] != "sgdph":
            return o["name"]
        estimator = o["estimator"]
        if estimator != "gnb" and o.get("engine", "autograd") != "autograd":
            estimator += "/" + o["engine"]
        rule = "authors" if o.get("authors_code") else o.get("rule", "paper")
        return f"sgdph {estimator} {rule}"

    @property
    def world_size(self) -> int | None:
        """The processes it trained on (None: a run older than that record that trained with DDP)."""
        if not self.rows:
            return None
        first = self.rows[0]
        return first.get("world_size", None if "replicas_in_sync" in first else 1)

    def experiment_settings(self) -> dict[str, Any]:
        """The full resolved recipe without seed, name and output folder, plus the world size:
        equal settings are repeats (a DDP run is not a repeat of a single-process one)."""
        recipe = applicable_settings(self.recipe)  # keys the run did not use do not tell runs apart
        recipe["trainer"] = {k: v for k, v in recipe["trainer"].items() if k not in _SEED_ONLY}
        recipe["trainer"]["world_size"] = self.world_size
        return recipe

    def experiment_key(self) -> str:
        return json.dumps(self.experiment_settings(), sort_keys=True)


def run_folders(paths: list[Path]) -> list[Path]:
    """The run folders named, with a sweep folder (one holding ``sweep.json``) standing for every run
    of its manifest that has finished an epoch or diverged."""
    from ..records import read_json
    from .sweep import MANIFEST

    folders: list[Path] = []
    for path in paths:
        if (path / MANIFEST).is_file() and not (path / "recipe.yaml").is_file():
            names = [r["name"] for r in read_json(path / MANIFEST, "sweep")["records"]]
            folders += [
                path / n for n in names if read_metrics(path / n / "metrics.jsonl") or (path / n / DIVERGED).is_file()
            ]
        else:
            folders.append(path)
    return folders


def load_run(path: Path) -> Run:
    recipe_file, metrics_file = path / "recipe.yaml", path / "metrics.jsonl"
    diverged = (path / DIVERGED).is_file()
    if not recipe_file.is_file() or not (metrics_file.is_file() or diverged):
        raise UserError(f"{path} is not a run folder: it needs recipe.yaml and metrics.jsonl (written by sgdph train)")
    rows = read_metrics(metrics_file)
    if not rows and not diverged:
        raise UserError(f"{path} has no finished epoch yet")
    return Run(path, with_defaults(yaml.safe_load(recipe_file.read_text())), rows, diverged)


def _group(runs: list[Run]) -> list[list[Run]]:
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.experiment_key(), []).append(run)
    return list(groups.values())


def summarize(runs: list[Run], include_unfinished: bool = False) -> tuple[list[dict], list[dict]]:
    """Per-run rows, and per-experiment rows (runs grouped by everything but the seed). Unfinished
    runs are listed and counted, but left out of the means unless ``include_unfinished``."""
    per_run = []
    for run in runs:
        final, selected = run.final, run.selected()
        per_run.append(
            {
                "run": str(run.path),
                "experiment": run.label,
                "seed": run.seed,
                "diverged": run.diverged,
                "unfinished": run.unfinished,
                "epochs": final["epoch"] if final else 0,
                "final_acc1": final["test_acc1"] if final else None,
                "final_acc5": final["test_acc5"] if final else None,
                "final_train_loss": final["train_loss"] if final else None,
                "best_val_acc1": selected["val_acc1"] if selected else None,
                "best_val_epoch": selected["epoch"] if selected else None,
                "test_acc1_at_best_val": selected["test_acc1"] if selected else None,
            }
        )
    per_experiment = []
    for members in _group(runs):
        finished = [m for m in members if not m.diverged and (include_unfinished or not m.unfinished)]
        selected = [m.selected() for m in finished]
        seeds = [m.seed for m in members]
        final = [m.final["test_acc1"] for m in finished]
        at_best = [s["test_acc1"] for s in selected] if selected and all(selected) else []
        per_experiment.append(
            {
                "experiment": members[0].label,
                "world_size": members[0].world_size,
                "strategy": members[0].recipe["trainer"].get("strategy", "ddp"),  # a recipe key: groups apart
                "runs": len(members),
                "seeds": seeds,
                "distinct_seeds": len(set(seeds)),
                "repeated_seeds": sorted({s for s in seeds if seeds.count(s) > 1}),
                "diverged": sum(m.diverged for m in members),
                "unfinished": sum(m.unfinished for m in members),
                "unfinished_included": include_unfinished,
                "final_acc1_mean": statistics.mean(final) if final else None,
                "final_acc1_std": statistics.stdev(final) if len(final) > 1 else None,
                "test_acc1_at_best_val_mean": statistics.mean(at_best) if at_best else None,
                "test_acc1_at_best_val_std": statistics.stdev(at_best) if len(at_best) > 1 else None,
            }
        )
    return per_run, per_experiment


# ----------------------------------------------------------------------------- the best per contender


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, dotted))
        else:
            flat[dotted] = value
    return flat


def _scores(run: Run, by: str) -> tuple[float, float]:
    """(validation score, test top-1) of the run's selected epoch; a diverged run scores the worst."""
    key, larger, _ = SELECTION[by]
    if run.diverged:
        return (0.0 if larger else math.inf), 0.0
    selected = run.selected(by)
    if selected is None:
        raise UserError(
            f"{run.path} has no validation set: a selection needs data.val_fraction > 0 (never the test set)"
        )
    return selected[key], selected["test_acc1"]


def best_per_contender(runs: list[Run], by: str = "val_top1", include_unfinished: bool = False) -> list[dict]:
    """Every configuration of the grid (runs grouped over seeds) with its validation mean, test mean ±
    std over its distinct seeds and diverged count; ``best`` marks, per contender, the configuration
    with the best mean validation score. Unfinished runs are left out (counted) unless
    ``include_unfinished``; a configuration with only unfinished runs is not in the grid."""
    if by not in SELECTION:
        raise UserError(f"--by must be one of {', '.join(SELECTION)}, got {by!r}")
    larger = SELECTION[by][1]
    groups = _group(runs)
    flat = [_flatten(g[0].experiment_settings()) for g in groups]
    # a key differs when the groups that use it disagree on it (an SGDM group has no estimator to compare)
    differing = sorted({k for f in flat for k in f if len({json.dumps(x[k]) for x in flat if k in x}) > 1})
    rows = []
    for members, settings in zip(groups, flat):
        seeds = [m.seed for m in members]
        if len(set(seeds)) != len(seeds):
            twice = sorted({s for s in seeds if seeds.count(s) > 1})
            raise UserError(f"seed(s) {twice} appear twice among the runs of one configuration ({members[0].path})")
        counted = [m for m in members if include_unfinished or not m.unfinished]
        if not counted:
            continue
        scores = [_scores(m, by) for m in counted]
        val, test = [s[0] for s in scores], [s[1] for s in scores]
        rows.append(
            {
                "config": {k: settings.get(k) for k in differing},
                "optimizer": members[0].contender,
                "seeds": sorted(m.seed for m in counted),
                "diverged": sum(m.diverged for m in members),
                "unfinished": sum(m.unfinished for m in members),
                "val_mean": statistics.mean(val),
                "test_mean": statistics.mean(test),
                "test_std": statistics.stdev(test) if len(test) > 1 else 0.0,
                "best": False,
            }
        )
    for contender in dict.fromkeys(r["optimizer"] for r in rows):
        mine = [r for r in rows if r["optimizer"] == contender]
        pick = max(mine, key=lambda r: r["val_mean"]) if larger else min(mine, key=lambda r: r["val_mean"])
        pick["best"] = True
    return rows


def plot_against_lr(rows: list[dict], path: Path) -> None:
    """Mean validation (solid) and test (dashed) top-1 against the learning rate, one colour per
    contender; where other keys vary too, each lr shows the contender's best configuration there."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for contender in dict.fromkeys(r["optimizer"] for r in rows):
        by_lr: dict[float, dict] = {}
        for r in rows:
            lr = r["config"].get("optimizer.lr")
            if r["optimizer"] == contender and lr is not None:
                if lr not in by_lr or r["val_mean"] > by_lr[lr]["val_mean"]:
                    by_lr[lr] = r
        if not by_lr:
            continue
        lrs = sorted(by_lr)
        line = ax.plot(lrs, [by_lr[x]["val_mean"] for x in lrs], marker="o", label=f"{contender} (val)")[0]
        ax.plot(
            lrs,
            [by_lr[x]["test_mean"] for x in lrs],
            marker="x",
            ls="--",
            color=line.get_color(),
            label=f"{contender} (test)",
        )
    ax.set(xscale="log", xlabel="learning rate", ylabel="top-1 (%)", title="accuracy against the learning rate")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_comparison(runs: list[Run], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(11, 4))
    for run in runs:
        if not run.rows:
            continue
        epochs = [r["epoch"] for r in run.rows]
        label = f"{run.label} s{run.seed}"
        ax_acc.plot(epochs, [r["test_acc1"] for r in run.rows], label=label)
        ax_loss.plot(epochs, [r["train_loss"] for r in run.rows], label=label)
    ax_acc.set(xlabel="epoch", ylabel="test top-1 (%)", title="test accuracy")
    ax_loss.set(xlabel="epoch", ylabel="train loss", title="training loss", yscale="log")
    ax_acc.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
