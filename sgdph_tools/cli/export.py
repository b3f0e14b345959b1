"""``sgdph export CHECKPOINT -o OUT``: bake weight-normalised layers back into plain ones."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import UserError
from ..io import atomic_save, refuse_overwriting_input
from ..surgery.checkpoint import load_model
from ..surgery.export import export_plain
from ._output import console
from .app import app


@app.command("export")
def export_command(
    checkpoint: str = typer.Argument(..., help="A checkpoint written by `sgdph convert` (or `sgdph train`)."),
    output: Path = typer.Option(..., "--output", "-o", help="Where to write the plain state_dict."),
    img_size: int | None = typer.Option(None, "--img-size", help="Input size for the verification."),
) -> None:
    """Fold every gamma · V/||V|| layer into a plain conv/linear and write a state_dict that
    the original architecture (timm's or torchvision's) loads; outputs are verified unchanged."""
    refuse_overwriting_input(output, checkpoint)
    net, spec, conversion = load_model(checkpoint)
    if conversion is None:
        raise UserError(f"{checkpoint} is not a converted checkpoint: there is nothing to bake")
    state_dict, max_error = export_plain(net, spec, img_size)
    atomic_save(state_dict, output)
    console.print(
        f"baked {len(conversion['layers'])} layers of {spec.display_name}; "
        f"verification: max |output difference| = {max_error:.3g}"
    )
    if spec.source == "torchvision":
        how = f"torchvision.models.get_model('{spec.name}', weights=None, **{spec.kwargs})"
    else:
        how = f"timm.create_model('{spec.name}', **{spec.kwargs})"
    console.print(f"wrote {output} (load with {how}.load_state_dict(torch.load(...)))")
