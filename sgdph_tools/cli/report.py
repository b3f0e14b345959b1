"""``sgdph report RUN_OR_SWEEP_DIR... [--best [--by val_top1]] [--plot PNG] [--json OUT]``: runs, mean ± std
over seeds, and the best configuration per contender of a grid (chosen on validation, never on test)."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.table import Table

from ..errors import UserError
from ..records import dumps, write_json
from ..train.report import (
    SELECTION,
    best_per_contender,
    load_run,
    plot_against_lr,
    plot_comparison,
    run_folders,
    summarize,
)
from ._output import console
from .app import app


def _number(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


@app.command("report")
def report_command(
    runs: list[Path] = typer.Argument(..., help="Run folders written by sgdph train (runs/NAME), or sweep folders."),
    best: bool = typer.Option(False, "--best", help="The grid: per contender, the configuration best on validation."),
    by: str = typer.Option("val_top1", "--by", help=f"--best's validation score: {', '.join(SELECTION)}."),
    plot: Path | None = typer.Option(
        None, "--plot", help="Also write a plot (PNG): test accuracy and loss per run; with --best, accuracy vs lr."
    ),
    json_out: str | None = typer.Option(
        None, "--json", help="Also write the records as JSON to this file ('-': stdout only)."
    ),
    include_unfinished: bool = typer.Option(
        False, "--include-unfinished", help="Count runs stopped before their last epoch in the means (marked)."
    ),
) -> None:
    """Test accuracy per run (last epoch; and at the best validation epoch); mean ± std over seeds."""
    if by not in SELECTION:
        raise UserError(f"--by must be one of {', '.join(SELECTION)}, got {by!r}")
    loaded = [load_run(path) for path in run_folders(runs)]
    if not loaded:
        raise UserError(f"no finished epoch in {', '.join(map(str, runs))}")
    if best:
        records = best_per_contender(loaded, by, include_unfinished)
        kind, metadata = "selection", {"by": by, "unfinished_included": include_unfinished}
        if plot is not None:
            plot_against_lr(records, plot)
    else:
        per_run, per_experiment = summarize(loaded, include_unfinished)
        kind, records, metadata = "report", per_experiment, {"runs": per_run}
        if plot is not None:
            plot_comparison(loaded, plot)
    if json_out == "-":
        print(dumps(kind, records, **metadata))
        return
    if json_out is not None:
        write_json(json_out, kind, records, **metadata)
    if best:
        _print_selection(records, by)
    else:
        _print_report(metadata["runs"], records)
    for path, what in ((plot, "plot"), (json_out, "JSON")):
        if path is not None:
            console.print(f"wrote {what} {path}")


def _print_selection(rows: list[dict], by: str) -> None:
    keys = list(rows[0]["config"]) if rows else []
    table = Table(
        title=f"the grid; * = best mean {by} per contender (test is reported, not selected on)", title_justify="left"
    )
    for column in ("", "optimizer", *keys, "seeds", "diverged", "unfinished", f"{by} mean", "test top-1 mean ± std"):
        table.add_column(column)
    for r in sorted(rows, key=lambda r: (r["optimizer"], json.dumps(r["config"], sort_keys=True, default=str))):
        table.add_row(
            "*" if r["best"] else "",
            r["optimizer"],
            *(str(r["config"][k]) for k in keys),
            ",".join(map(str, r["seeds"])),
            str(r["diverged"]),
            str(r["unfinished"]),
            f"{r['val_mean']:.4g}",
            f"{r['test_mean']:.2f} ± {r['test_std']:.2f}",
            style="bold" if r["best"] else None,
        )
    console.print(table)


def _print_report(per_run: list[dict], per_experiment: list[dict]) -> None:
    table = Table(title="runs", title_justify="left")
    columns = (
        "run",
        "experiment",
        "seed",
        "epochs",
        "final top-1",
        "final top-5",
        "train loss",
        "best val top-1 (epoch)",
        "top-1 there",
    )
    for column in columns:
        table.add_column(column)
    for r in per_run:
        has_val = r["best_val_acc1"] is not None
        table.add_row(
            Path(r["run"]).name,
            r["experiment"],
            str(r["seed"]),
            str(r["epochs"]) + (" (diverged)" if r["diverged"] else " (unfinished)" if r["unfinished"] else ""),
            _number(r["final_acc1"]),
            _number(r["final_acc5"]),
            _number(r["final_train_loss"], ".4f"),
            f"{r['best_val_acc1']:.2f} ({r['best_val_epoch']})" if has_val else "-",
            _number(r["test_acc1_at_best_val"]),
        )
    console.print(table)
    included = bool(per_experiment) and per_experiment[0]["unfinished_included"]
    unfinished = "unfinished runs included (marked)" if included else "unfinished runs excluded and counted"
    table = Table(
        title=f"experiments (mean ± std over seeds; diverged runs excluded and counted; {unfinished})",
        title_justify="left",
    )
    columns = ("experiment", "processes", "runs", "distinct seeds", "diverged", "unfinished", "final top-1")
    for column in (*columns, "top-1 at best val"):
        table.add_column(column)
    for e in per_experiment:
        table.add_row(
            e["experiment"],
            f"{e['world_size'] or '?'}{' (fsdp)' if e['strategy'] == 'fsdp' else ''}",
            str(e["runs"]),
            str(e["distinct_seeds"]),
            str(e["diverged"]),
            str(e["unfinished"]),
            _mean_std(e["final_acc1_mean"], e["final_acc1_std"]),
            _mean_std(e["test_acc1_at_best_val_mean"], e["test_acc1_at_best_val_std"]),
        )
    console.print(table)
    for e in per_experiment:
        if e["repeated_seeds"]:
            console.print(
                f"note: {e['experiment']}: seed(s) {e['repeated_seeds']} appear more than once; the ± is over "
                f"{e['runs']} runs of {e['distinct_seeds']} distinct seeds, not over independent seeds",
                style="yellow",
            )


def _mean_std(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f}" if std is None else f"{mean:.2f} ± {std:.2f}"
