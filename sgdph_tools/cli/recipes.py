"""``sgdph recipes list`` and ``sgdph recipes copy NAME [DEST]``: the recipes that ship with the package."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.table import Table

from ..recipe_catalog import catalog, copy_recipe, recipes_root
from ._output import console
from .app import app

recipes_app = typer.Typer(
    help="The recipes that ship with sgdph-tools: list them, copy one to edit.", no_args_is_help=True
)
app.add_typer(recipes_app, name="recipes")


@recipes_app.command("list")
def list_command() -> None:
    """Every packaged recipe: its name (what `sgdph train NAME` takes), model, dataset, optimizer, paper table."""
    root = recipes_root()
    table = Table(title=f"packaged recipes ({root})", title_justify="left")
    for column in ("name", "model", "dataset", "optimizer", "reproduces", "file"):
        table.add_column(column)
    for info in catalog():
        table.add_row(
            info.name, info.model, info.dataset, info.optimizer, info.reproduces, info.path.relative_to(root).as_posix()
        )
    console.print(table)


@recipes_app.command("copy")
def copy_command(
    name: str = typer.Argument(..., help="A packaged recipe's name (see `sgdph recipes list`)."),
    dest: Path | None = typer.Argument(None, help="A file or folder to write to (default: ./NAME.yaml)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
) -> None:
    """Write a packaged recipe out to edit; train it with `sgdph train FILE`."""
    target = copy_recipe(name, dest, force=force)
    console.print(f"wrote {target}; run it with: sgdph train {target}")
