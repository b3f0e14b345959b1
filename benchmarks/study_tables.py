"""The tables and curves of docs/evidence.md, from the study's sweep folders (``benchmarks/study.py
tables``). Everything here is read from the runs' own files: the sweep manifests (which run is which
configuration and seed) and each run's ``metrics.jsonl``."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from study import chosen, in_grid, stage1_grids, sweeps  # benchmarks/study.py

from sgdph_tools.train.metrics import read_metrics

FIGURES = Path(__file__).resolve().parents[1] / "docs" / "evidence"
# the Δ columns: SGDM as the paper ran it, and SGDM as timm builds it (no weight decay on 1-D parameters)
REFERENCES = ("sgd", "sgd-no1dwd")


def _runs(folder: Path) -> list[dict]:
    manifest = folder / "sweep.json"
    return json.loads(manifest.read_text())["records"] if manifest.is_file() else []


def _matches(run: dict, config: dict) -> bool:
    return all(run["config"].get(k) == v for k, v in config.items())


def _fmt(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def _short(config: dict) -> str:
    names = {"optimizer.lr": "lr", "optimizer.weight_decay": "wd", "optimizer.so_lr": "τ", "optimizer.eps": "ε"}
    names["optimizer.damping"] = "λ"  # block-hf's initial damping
    return ", ".join(f"{names[k]} {v:g}" for k, v in config.items() if k in names)


def contender_rows(root: Path, names: list[str]) -> dict[str, list[dict]]:
    """Per benchmark/net: one row per contender -- its chosen configuration, the seeds it ran, the
    test top-1 of each, validation of seed 0, minutes per run."""
    table: dict[str, list[dict]] = {}
    for name, _recipe, axes in sweeps(root):
        if name not in names:
            continue
        folder = root / name
        setting, contender = name.split("/")
        grids = stage1_grids(folder, axes)
        config = chosen(folder, grids)
        tuned = [r for r in _runs(folder) if r["seed"] == 0 and any(in_grid(r["config"], g) for g in grids)]
        row = {"contender": contender, "config": config, "grid": len(tuned)}
        if config is not None:
            finished = ("done", "diverged")  # a pending or failed run is not a result (yet)
            seeds = sorted(
                (r for r in _runs(folder) if _matches(r, config) and r["status"] in finished), key=lambda r: r["seed"]
            )
            row["seeds"] = [r["seed"] for r in seeds]
            row["diverged"] = sum(r["status"] == "diverged" for r in seeds)
            row["test"] = [r["final"]["test_acc1"] if r["status"] == "done" else 0.0 for r in seeds]
            row["val0"] = next(r["final"]["val_acc1"] for r in seeds if r["seed"] == 0)
            minutes = []
            curves = []
            for r in seeds:
                rows = read_metrics(folder / r["name"] / "metrics.jsonl")
                if rows:
                    minutes.append(sum(x["seconds"] for x in rows) / 60)
                    curves.append([x["test_acc1"] for x in rows])
            row["minutes"] = statistics.mean(minutes) if minutes else None
            row["curves"] = curves
        table.setdefault(setting, []).append(row)
    return table


def grid_rows(root: Path, name: str, axes: list[str]) -> list[tuple[str, float | None, float | None, str]]:
    """Stage 1 of one sweep: (configuration, validation top-1, test top-1, status) for seed 0, over
    the grid and its extension (runs of an earlier grid in the folder are left out)."""
    out = []
    grids = stage1_grids(root / name, axes)
    for r in sorted(_runs(root / name), key=lambda r: r["name"]):
        if r["seed"] != 0 or not any(in_grid(r["config"], g) for g in grids):
            continue
        final = r.get("final") or {}
        out.append((_short(r["config"]), final.get("val_acc1"), final.get("test_acc1"), r["status"]))
    return out


def plot(setting: str, rows: list[dict]) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for row in rows:
        curves = [c for c in row.get("curves", []) if c]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        mean = [statistics.mean(c[i] for c in curves) for i in range(length)]
        ax.plot(range(1, length + 1), mean, label=f"{row['contender']} ({len(curves)} seeds)")
    ax.set(xlabel="epoch", ylabel="test top-1 (%)", title=f"{setting}: the chosen configurations, mean over seeds")
    ax.legend(fontsize=7)
    fig.tight_layout()
    FIGURES.mkdir(parents=True, exist_ok=True)
    path = FIGURES / f"{setting}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _delta(row: dict, reference: dict | None) -> str:
    """The difference of the means, and that difference over its standard error; "—" without two
    seeds on each side."""
    if reference is None or row is reference or len(row["test"]) < 2 or len(reference["test"]) < 2:
        return "—"
    a, b = row["test"], reference["test"]
    diff = statistics.mean(a) - statistics.mean(b)
    noise = (statistics.stdev(a) ** 2 / len(a) + statistics.stdev(b) ** 2 / len(b)) ** 0.5
    return f"{diff:+.2f} ({diff / noise:+.1f} σ)" if noise > 0 else f"{diff:+.2f}"


def print_tables(root: Path, names: list[str]) -> None:
    for setting, rows in contender_rows(root, names).items():
        reference = {c: next((r for r in rows if r["contender"] == c and r.get("test")), None) for c in REFERENCES}
        print(f"\n### {setting}\n")
        print(
            "| contender | configurations | chosen on validation (seed 0) | seeds | test top-1 | "
            + " | ".join(f"Δ vs {c}" for c in REFERENCES)
            + " | min/run |"
        )
        print("|---|---|---|---|---|" + "---|" * len(REFERENCES) + "---|")
        for row in rows:
            if row["config"] is None:
                print(f"| {row['contender']} | {row['grid']} | not run | | |" + " |" * len(REFERENCES) + " |")
                continue
            test = row["test"]
            deltas = " | ".join(_delta(row, reference[c]) for c in REFERENCES)
            diverged = f", {row['diverged']} diverged" if row["diverged"] else ""
            minutes = f"{row['minutes']:.1f}" if row["minutes"] is not None else "—"
            print(
                f"| {row['contender']} | {row['grid']} | {_short(row['config'])} | {len(test)}{diverged} | "
                f"{_fmt(test)} | {deltas} | {minutes} |"
            )
        print(f"\n![{setting}](evidence/{plot(setting, rows).name})")
    print("\n### Stage 1 grids (seed 0): validation / test top-1\n")
    for name, _recipe, axes in sweeps(root):
        if name not in names:
            continue
        cells = [
            f"{c}: {v:.1f} / {t:.1f}" if v is not None else f"{c}: {s}" for c, v, t, s in grid_rows(root, name, axes)
        ]
        if cells:
            print(f"- `{name}`: " + "; ".join(cells))
