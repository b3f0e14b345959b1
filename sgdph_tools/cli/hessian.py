"""``sgdph hessian MODEL``: how far the channel-wise curvature blocks are from diagonal, and how exact
each estimator × engine is against the quantity it claims to estimate."""

from __future__ import annotations

from pathlib import Path

import torch
import typer
from rich.table import Table

from ..errors import UserError
from ..exactness import exactness_report, select_tensors
from ..records import write_json
from ..surgery.checkpoint import load_model
from ._output import console
from .app import app

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def _batch(model, recipe: Path | None, batch: int, img_size: int | None, num_classes: int, seed: int):
    if recipe is not None:
        from ..data.datasets import build_datasets
        from ..recipe import load_recipe

        bundle = build_datasets(load_recipe(recipe).data)
        xs, ys = zip(*(bundle.train[i] for i in range(min(batch, len(bundle.train)))))
        return torch.stack(xs), torch.as_tensor(ys)
    g = torch.Generator().manual_seed(seed)
    cfg = getattr(model, "pretrained_cfg", {}) or {}
    channels, height, width = cfg.get("input_size", (3, 32, 32))
    size = (img_size, img_size) if img_size else (height, width)
    return torch.randn(batch, channels, *size, generator=g), torch.randint(0, num_classes, (batch,), generator=g)


@app.command("hessian")
def hessian_command(
    source: str = typer.Argument(..., help="A model name (timm, torchvision:NAME) or a converted checkpoint."),
    batch: int = typer.Option(32, "--batch", help="Batch size."),
    layers: str = typer.Option("*", "--layers", help="Glob on parameter names, e.g. '*bn1.weight'."),
    dtype: str = typer.Option("float32", "--dtype", help="float32 or float64: the dtype the estimators run in."),
    recipe: Path | None = typer.Option(
        None, "--recipe", help="Take the batch from this recipe's training data (default: random)."
    ),
    img_size: int | None = typer.Option(
        None, "--img-size", help="Input size of the random batch (default: the model's)."
    ),
    num_classes: int = typer.Option(10, "--num-classes", help="Classes of a model built by name."),
    max_tensors: int = typer.Option(8, "--max-tensors", help="At most this many tensors (the first that match)."),
    max_channels: int = typer.Option(
        32, "--max-channels", help="Exact rows for at most this many channels per tensor."
    ),
    draws: int = typer.Option(100, "--draws", help="Draws averaged for the stochastic estimators (hutchinson, gnb)."),
    seed: int = typer.Option(
        0, "--seed", help="Seed of the model's initialisation (a model built by name), the random batch and the probes."
    ),
    precondition_max: int = typer.Option(
        256,
        "--precondition-max",
        help="Compare curvature models on tensors of at most this many entries (whole block).",
    ),
    block_draws: int = typer.Option(
        10, "--block-draws", help="GNB draws averaged into the curvature models compared (an EMA over ~10 refreshes)."
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the report to this JSON file."),
) -> None:
    """Exact Hessian and Gauss-Newton blocks (float64) against every estimate, per second-order tensor."""
    if dtype not in DTYPES:
        raise UserError(f"--dtype must be float32 or float64, got {dtype!r}")
    for name, value in (
        ("--batch", batch),
        ("--max-tensors", max_tensors),
        ("--max-channels", max_channels),
        ("--draws", draws),
        ("--num-classes", num_classes),
        ("--block-draws", block_draws),
    ):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if batch < 2:
        raise UserError("--batch must be at least 2 (BatchNorm in train mode needs two examples)")
    torch.manual_seed(seed)  # a model built by name is initialised from the seed too: the report is reproducible
    model, spec, _ = load_model(source, num_classes=num_classes, img_size=img_size)
    names = select_tensors(model, layers, max_tensors)
    if not names:
        raise UserError(
            f"no second-order tensor of {spec.display_name} matches --layers {layers!r} "
            "(see `sgdph inspect` for the names)"
        )
    x, y = _batch(model, recipe, batch, img_size, num_classes, seed)
    torch.manual_seed(seed)
    report = exactness_report(
        model,
        x,
        y,
        names,
        dtype=DTYPES[dtype],
        max_channels=max_channels,
        draws=draws,
        seed=seed,
        precondition_max=precondition_max,
        block_draws=block_draws,
    )
    console.print(f"{spec.display_name}, batch {len(y)}, estimators in {dtype}, exact blocks in float64")
    table = Table(title="block structure (exact, on the channels shown)", title_justify="left")
    for column in ("tensor", "numel", "channels", "Hessian off-diag / diag", "Gauss-Newton off-diag / diag"):
        table.add_column(column)
    for b in report["blocks"]:
        table.add_row(
            b["tensor"],
            str(b["numel"]),
            str(b["channels"]),
            f"{b['hessian_off_diagonal']:.2f}",
            f"{b['ggn_off_diagonal']:.2f}",
        )
    console.print(table)
    table = Table(title="estimates against their exact target", title_justify="left")
    for column in ("tensor", "estimator", "engine", "target", "draws", "cosine", "relative error"):
        table.add_column(column)
    for r in report["estimates"]:
        how = r["engine"] or (f"batch x {r['gnb_fraction']:g}" if r.get("gnb_fraction") is not None else "-")
        table.add_row(
            r["tensor"],
            r["estimator"],
            how,
            r["target"],
            str(r["draws"]),
            f"{r['cosine']:.4f}",
            f"{r['relative_error']:.2e}",
        )
    console.print(table)
    if report["preconditioning"]:
        table = Table(
            title=f"how each curvature model preconditions (GNB models: mean of {block_draws} draws; "
            "efficiency: line-search decrease / the exact block's)",
            title_justify="left",
        )
        for column in ("tensor", "numel", "model", "efficiency", "condition of P⁻¹(G+δI)"):
            table.add_column(column)
        for r in report["preconditioning"]:
            table.add_row(r["tensor"], str(r["numel"]), r["model"], f"{r['efficiency']:.3f}", f"{r['condition']:.3g}")
        console.print(table)
    else:
        console.print(f"(no tensor of at most {precondition_max} entries: raise --precondition-max to compare models)")
    if json_out is not None:
        write_json(
            json_out,
            "hessian",
            report["estimates"],
            model=spec.display_name,
            batch=len(y),
            dtype=report["dtype"],
            blocks=report["blocks"],
            preconditioning=report["preconditioning"],
        )
        console.print(f"wrote {json_out}")
