"""``sgdph inspect MODEL_OR_CHECKPOINT``: every parameter with its kind and optimizer path."""

from __future__ import annotations

from pathlib import Path

import typer

from ..surgery.checkpoint import load_model
from ..surgery.rewrite import convert, example_input_for
from ._output import (
    console,
    layer_table,
    parameter_rows,
    parameter_table,
    parameter_totals,
    print_json,
    summary_line,
    totals_table,
)
from .app import app


@app.command("inspect")
def inspect_command(
    source: str = typer.Argument(..., help="A model name (shows what `convert --wn` would do) or a checkpoint."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON instead of tables."),
    wn: bool = typer.Option(
        True, "--wn/--no-wn", help="For a model name: show it after decoupling (default) or as it is."
    ),
    strip_norm: bool = typer.Option(
        False, "--strip-norm", help="For a model name: as `convert --strip-norm` would make it."
    ),
    exclude: list[str] = typer.Option([], "--exclude", "-x", help="As for convert."),
    num_classes: int | None = typer.Option(None, "--num-classes", help="Classifier size (model names only)."),
    img_size: int | None = typer.Option(
        None, "--img-size", help="Input size for the analysis (and for models that fix it, e.g. ViTs)."
    ),
    arch: str | None = typer.Option(None, "--model", help="Architecture of a plain state_dict checkpoint."),
    show_layers: bool = typer.Option(False, "--layers", help="Also print the decision for every conv/linear layer."),
) -> None:
    """Show every parameter: name, shape, kind, group (second/first order), numel, and totals."""
    net, spec, conversion = load_model(source, model_name=arch, num_classes=num_classes, img_size=img_size)
    report = None
    is_name = not Path(source).is_file()
    if is_name and (wn or strip_norm):  # nothing is written: a dry run of convert
        net, report = convert(
            net, wn=wn, strip_norm=strip_norm, exclude=exclude, example_input=example_input_for(net, img_size)
        )
    rows = parameter_rows(net)
    totals = parameter_totals(rows)
    if as_json:
        print_json(
            "inspect",
            rows,
            model=spec.as_dict(),
            conversion=conversion
            or (report and {"wn": wn, "strip_norm": strip_norm, "exclude": exclude, "layers": report.decoupled}),
            totals=totals,
            layers=report.as_dict()["layers"] if report else None,
        )
        return
    title = spec.display_name + (
        f" ({source})" if not is_name else " (as `convert --wn` would make it)" if report and wn else ""
    )
    console.print(parameter_table(rows, title))
    console.print(totals_table(totals))
    if report is not None:
        console.print(summary_line(report))
        if show_layers:
            console.print(layer_table(report))
