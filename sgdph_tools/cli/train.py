"""``sgdph train RECIPE [key=value ...]``: train what a recipe says, on one process or several."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
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
        from ..train.build import check_buildable  # heavy imports only when needed

        check_buildable(resolved)
        console.print(f"# {recipe_path} resolved with {len(overrides or [])} override(s); valid", style="dim")
        print(resolved.to_yaml(applicable_only=True), end="")
        return
    if nproc > 1 and "WORLD_SIZE" not in os.environ:
        run_dir = Path(resolved.trainer.output_dir) / str(resolved.trainer.name)
        raise typer.Exit(_launch_torchrun(nproc, recipe_path, overrides or [], resume, allow_changes, run_dir))
    from ..train import Trainer  # heavy imports only when training

    Trainer(resolved, resume=resume, allow_changes=allow_changes).run()


def _launch_torchrun(
    nproc: int, recipe: Path, overrides: list[str], resume: bool, allow_changes: bool, run_dir: Path
) -> int:
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
    return run_process_group(command, run_dir)


#: Seconds the processes get to stop after a forwarded SIGINT/SIGTERM before they are killed.
STOP_GRACE_SECONDS = 10.0


def run_process_group(command: list[str], run_dir: Path | None = None) -> int:
    """Run ``command`` (torchrun) in a process group of its own and wait for it. SIGINT or SIGTERM to
    this process goes to the whole group -- torchrun and every worker -- so none is left running;
    whatever has not stopped after ``STOP_GRACE_SECONDS`` is killed. Returns the command's exit code,
    or 128 + the signal's number when a signal stopped it (non-zero either way)."""
    proc = subprocess.Popen(command, start_new_session=True)
    received: list[tuple[int, float]] = []  # (signal, when)

    def forward(signum, _frame):
        received.append((signum, time.monotonic()))
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while proc.poll() is None:
            time.sleep(0.2)
            if received and time.monotonic() - received[0][1] > STOP_GRACE_SECONDS:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if received:
        with contextlib.suppress(ProcessLookupError):  # workers that outlived torchrun
            os.killpg(proc.pid, signal.SIGKILL)
        signum = received[0][0]
        last = run_dir / "last.pt" if run_dir is not None else None
        where = f"; continue with --resume (from {last})" if last is not None and last.exists() else ""
        console.print(f"stopped by {signal.Signals(signum).name}: every process ended{where}", style="yellow")
        return 128 + signum
    return proc.returncode
