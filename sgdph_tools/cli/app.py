"""The typer application; each command lives in its own module and registers itself here."""

from __future__ import annotations

import typer

from .. import __version__

app = typer.Typer(
    name="sgdph",
    help="SGD with Partial Hessian (SGD-PH): convert, inspect and train timm models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"sgdph-tools {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(
        False, "--version", callback=_version, is_eager=True, help="Show the version and exit."
    ),
) -> None:
    """SGD with Partial Hessian (SGD-PH): convert, inspect and train timm models."""
