"""``sgdph convert MODEL``: decouple conv/linear layers into weight-normalised ones and save."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import UserError
from ..io import refuse_overwriting_input
from ..surgery.checkpoint import load_model, save_converted
from ..surgery.rewrite import DECOUPLED, EXCLUDED, NORMALISED, convert, example_input_for
from ._output import console, layer_table, parameter_rows, parameter_totals, summary_line, totals_table
from .app import app


def default_output(name: str, wn: bool, strip_norm: bool) -> Path:
    stem = name.split(":")[-1].replace("/", "_")
    return Path(f"{stem}{'_nonorm' if strip_norm else ''}{'_wn' if wn else ''}.pt")


@app.command("convert")
def convert_command(
    model: str = typer.Argument(
        ..., help="timm model name (resnet18, vgg19_nobn, ...), torchvision:NAME, or a plain checkpoint with --model."
    ),
    wn: bool = typer.Option(
        True,
        "--wn/--no-wn",
        help="Decouple every conv/linear that feeds no norm into gamma · V/||V|| + bias (the default); "
        "--no-wn with --strip-norm: only strip the norms.",
    ),
    add_bias: bool | None = typer.Option(
        None,
        "--add-bias/--no-add-bias",
        help="Give decoupled layers without a bias a zero one (default: only with --strip-norm). Once "
        "trained, such a model no longer exports to its original architecture.",
    ),
    strip_norm: bool = typer.Option(
        False, "--strip-norm", help="First replace every norm layer by an identity (a 'without BN' variant)."
    ),
    exclude: list[str] = typer.Option(
        [], "--exclude", "-x", help="fnmatch pattern of layer names to leave alone (repeatable)."
    ),
    num_classes: int | None = typer.Option(None, "--num-classes", help="Classifier size."),
    img_size: int | None = typer.Option(
        None, "--img-size", help="Input size for verification (and for models that fix it, e.g. ViTs)."
    ),
    arch: str | None = typer.Option(None, "--model", help="Architecture of a plain state_dict checkpoint."),
    output: Path | None = typer.Option(None, "--output", "-o", help="Where to write (default: MODEL[_nonorm]_wn.pt)."),
    show_layers: bool = typer.Option(False, "--layers", help="Print the decision for every conv/linear layer."),
) -> None:
    """Decouple a model's conv/linear layers that no norm follows, verify, and save a checkpoint."""
    if not wn and not strip_norm:
        raise UserError(
            "--no-wn without --strip-norm would leave the model as it is: drop --no-wn to decouple, add "
            "--strip-norm to only strip the norms, or see what would be decoupled with `sgdph inspect MODEL`"
        )
    net, spec, conversion = load_model(model, model_name=arch, num_classes=num_classes, img_size=img_size)
    if conversion is not None:
        raise UserError(f"{model} is already a converted checkpoint; convert the original model instead")
    net, report = convert(
        net,
        wn=wn,
        strip_norm=strip_norm,
        exclude=exclude,
        example_input=example_input_for(net, img_size),
        add_bias=add_bias,
    )
    if report.add_bias and not strip_norm:
        console.print(
            "note: --add-bias gave bias-free layers a bias; once it trains away from zero, `sgdph export` cannot "
            "put the model back into its original architecture (use the converted checkpoint)",
            style="yellow",
        )
    out = output or default_output(spec.display_name if arch is None else arch, wn, strip_norm)
    if Path(model).exists():
        refuse_overwriting_input(out, model)
    save_converted(out, net, spec, report)

    counts = report.counts()
    console.print(f"[bold]{spec.display_name}[/bold] {spec.kwargs or ''}")
    console.print(summary_line(report))
    console.print(
        f"  decoupled: {counts.get(DECOUPLED, 0)}   already normalised: {counts.get(NORMALISED, 0)}   "
        f"excluded: {counts.get(EXCLUDED, 0)}"
    )
    if report.stripped_norms:
        console.print(f"  norm layers replaced by identities: {len(report.stripped_norms)}")
    if not report.traced:
        console.print(f"  [yellow]tracing failed ({report.trace_error}); decided by module order[/yellow]")
    for note in report.notes:
        console.print(f"  [yellow]note:[/yellow] {note}")
    if show_layers:
        console.print(layer_table(report))
    console.print(totals_table(parameter_totals(parameter_rows(net))))
    console.print(
        f"verification: max |output difference| = {report.max_abs_error:.3g} on input {tuple(report.input_shape)}"
    )
    console.print(f"wrote {out}")
