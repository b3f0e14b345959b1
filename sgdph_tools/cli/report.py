"""``sgdph report RUN_DIR...``: a table of runs, mean ± std over seeds, and a comparison plot."""
from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..train.report import load_run, plot_comparison, summarize
from ._output import console, print_json
from .app import app


@app.command("report")
def report_command(
    runs: list[Path] = typer.Argument(..., help="Run folders written by sgdph train (runs/NAME)."),
    plot: Path | None = typer.Option(None, "--plot", help="Also write a comparison plot (PNG) of test accuracy and loss."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables."),
) -> None:
    """Final and best test accuracy per run; mean ± std for runs that differ only by seed."""
    loaded = [load_run(path) for path in runs]
    per_run, per_experiment = summarize(loaded)
    if plot is not None:
        plot_comparison(loaded, plot)
    if as_json:
        print_json({"runs": per_run, "experiments": per_experiment})
        return
    table = Table(title="runs", title_justify="left")
    for column in ("run", "experiment", "seed", "epochs", "final top-1", "best top-1", "final top-5", "train loss"):
        table.add_column(column)
    for r in per_run:
        table.add_row(Path(r["run"]).name, r["experiment"], str(r["seed"]), str(r["epochs"]), f"{r['final_acc1']:.2f}",
                      f"{r['best_acc1']:.2f}", f"{r['final_acc5']:.2f}", f"{r['final_train_loss']:.4f}")
    console.print(table)
    table = Table(title="experiments (mean ± std over seeds)", title_justify="left")
    for column in ("experiment", "runs", "final top-1", "best top-1"):
        table.add_column(column)
    for e in per_experiment:
        table.add_row(e["experiment"], str(e["runs"]), e["final_acc1"], e["best_acc1"])
    console.print(table)
    if plot is not None:
        console.print(f"wrote {plot}")
