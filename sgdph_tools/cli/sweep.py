"""``sgdph sweep RECIPE key=v1,v2 ... --seeds 0-3 [--jobs N] [--dir DIR]``: a grid of runs, resumable."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from ..errors import UserError
from ..recipe_catalog import resolve_recipe
from ..train.sweep import Sweep, parse_axes, parse_seeds, plan, run_sweep, threads_per_job
from ._output import console
from .app import app


@app.command("sweep")
def sweep_command(
    recipe: str = typer.Argument(..., help="The base recipe: a file or a packaged recipe's name."),
    axes: list[str] = typer.Argument(
        None, help="Swept keys: optimizer.lr=0.1,0.01 (lists in brackets: [0.9,0.99],[0.9,0.999])."
    ),
    seeds: str = typer.Option("0", "--seeds", help="Seeds of every configuration: 0-3, 0,1,2, or a mix."),
    jobs: int = typer.Option(
        1, "--jobs", help="Runs at once (worker processes); the CPU threads are split between them."
    ),
    folder: Path | None = typer.Option(None, "--dir", help="The sweep's folder (default: runs/sweep-<recipe>)."),
) -> None:
    """Train the grid × seeds, one run folder each, with a manifest; a second call trains only what is missing."""
    if jobs < 1:
        raise UserError(f"--jobs must be at least 1, got {jobs}")
    base = resolve_recipe(recipe)
    folder = folder or Path("runs") / f"sweep-{base.stem}"
    seed_list = parse_seeds(seeds)
    runs = plan(parse_axes(axes or []), seed_list)
    sweep = Sweep(folder, base, runs)
    todo = sweep.todo()
    done = sum(r.status == "done" for r in sweep.runs if r.name in sweep.requested)
    diverged = sum(r.status == "diverged" for r in sweep.runs if r.name in sweep.requested)
    console.print(
        f"sweep {folder}: {len(runs)} runs ({len(runs) // len(seed_list)} configurations x "
        f"{len(seed_list)} seeds); {done} finished, {diverged} diverged, {len(todo)} to train "
        f"with {min(jobs, max(1, len(todo)))} job(s) of {threads_per_job(jobs)} thread(s)"
    )
    columns = (TextColumn("training"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True, disable=not todo) as progress:
        task = progress.add_task("sweep", total=len(todo))

        def on_event(event: str, run) -> None:
            if event == "queued":
                return
            progress.advance(task)
            if event == "done":
                f = run.final
                val = f"val top-1 {f['val_acc1']:.2f}  " if "val_acc1" in f else ""
                console.print(f"done      {run.name}: {val}test top-1 {f.get('test_acc1', float('nan')):.2f}")
            else:
                console.print(f"{event:<9} {run.name}: {run.message}")

        run_sweep(sweep, jobs, on_event)
    failed = [r for r in sweep.runs if r.name in sweep.requested and r.status == "failed"]
    console.print(f"manifest {folder / 'sweep.json'}; compare with: sgdph report {folder}")
    if failed:
        raise UserError(f"{len(failed)} run(s) failed (see their log.txt); call the same sweep again to retry them")
