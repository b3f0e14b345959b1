"""``sgdph train RECIPE [key=value ...]``: train what a recipe says, on one process or several."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import typer

from ..errors import UserError
from ..recipe import load_recipe
from ..recipe_catalog import resolve_recipe
from ._output import console
from .app import app


@app.command("train", context_settings={"allow_extra_args": False})
def train_command(
    recipe: str = typer.Argument(..., help="A recipe YAML file, or a packaged recipe's name (`sgdph recipes list`)."),
    overrides: list[str] = typer.Argument(None, help="Dotted overrides, e.g. optimizer.lr=0.05 trainer.epochs=1."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate and print the resolved recipe; build nothing."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in the recipe's output folder from last.pt."),
    nproc: int = typer.Option(1, "--nproc", help="Processes (one per GPU) to launch with torchrun (DDP)."),
    allow_changes: bool = typer.Option(
        False,
        "--allow-changes",
        help="With --resume: continue with changed lr, weight_decay, so_lr, eps, grad_clip, epochs, ... "
        "(recorded in metrics.jsonl).",
    ),
) -> None:
    """Train a (possibly converted) timm model with SGD-PH or a baseline; write metrics, curves and checkpoints."""
    if nproc < 1:
        raise UserError(f"--nproc must be at least 1, got {nproc}")
    if allow_changes and not resume:
        raise UserError("--allow-changes applies to --resume only: add --resume to continue a run with new values")
    recipe_path = resolve_recipe(recipe)
    resolved = load_recipe(recipe_path, overrides or [])
    if resolved.trainer.batch_size % nproc:  # before any process starts: one line, not one per process
        raise UserError(
            f"trainer.batch_size={resolved.trainer.batch_size} (the global batch) does not split evenly over "
            f"--nproc {nproc} processes: choose a multiple of {nproc}"
        )
    if dry_run:
        from ..train.trainer import check_buildable  # heavy imports only when needed

        check_buildable(resolved)
        console.print(f"# {recipe_path} resolved with {len(overrides or [])} override(s); valid", style="dim")
        print(resolved.to_yaml(applicable_only=True), end="")
        return
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        raise typer.Exit(_launch_torchrun(nproc, recipe_path, overrides or [], resume, allow_changes))
    from ..train import Trainer  # heavy imports only when training

    Trainer(resolved, resume=resume, allow_changes=allow_changes).run()


def _launch_torchrun(nproc: int, recipe: Path, overrides: list[str], resume: bool, allow_changes: bool) -> int:
    """Re-run this command under torchrun with ``nproc`` processes on this machine."""
    command = (
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={nproc}",
            "-m",
            "sgdph_tools",
            "train",
            str(recipe),
            *overrides,
        ]
        + (["--resume"] if resume else [])
        + (["--allow-changes"] if allow_changes else [])
    )
    console.print(f"launching {nproc} processes: {' '.join(command[1:])}", style="dim")
    return subprocess.call(command)
