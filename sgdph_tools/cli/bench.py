"""``sgdph bench``: step time and peak memory of every SGD-PH mode, as ratios to SGDM in the same run."""

from __future__ import annotations

import fnmatch
from dataclasses import asdict
from pathlib import Path

import torch
import typer
from rich.table import Table

from ..bench import Mode, Settings, all_modes, compiled_modes, host_overhead, run, timing_window
from ..errors import UserError
from ..optim.compiled import COMPILE_MODES
from ..records import write_json
from ._output import console
from .app import app


@app.command("bench")
def bench_command(
    model: str = typer.Option(
        "resnet18_cifar", "--model", help="A timm model name (the project's registered ones included)."
    ),
    batch: int = typer.Option(128, "--batch", help="Batch size."),
    img_size: int = typer.Option(32, "--img-size", help="Input height and width (random data, the model's channels)."),
    num_classes: int = typer.Option(100, "--num-classes", help="Classes of the classifier head."),
    steps: int = typer.Option(
        20,
        "--steps",
        help="Timed steps per mode after a warm-up, in whole windows (of 10 steps when k=10 is measured; "
        "at least 10 on a GPU); the median over windows counts.",
    ),
    rounds: int = typer.Option(1, "--rounds", help="Rounds over all modes, interleaved; medians over rounds."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cpu or cuda."),
    threads: int | None = typer.Option(None, "--threads", help="CPU threads per measurement (default: torch's)."),
    only: list[str] = typer.Option(
        [],
        "--only",
        help="Measure only the modes whose label matches this glob "
        "(repeatable, e.g. --only 'sgdph gnb*' --only adahessian); SGDM always runs.",
    ),
    json_out: Path | None = typer.Option(None, "--json", help="Also write the records to this JSON file."),
    every: str = typer.Option(
        "1,10", "--every", help="The refresh intervals (hessian_every) to measure every SGD-PH mode at, e.g. 1,2,5,10."
    ),
    host: bool = typer.Option(
        False,
        "--host",
        help="Instead: the host time of optimizer.step() alone (tiny tensors in place of the model's "
        "parameters, one thread) for SGD-PH between refreshes, against SGD and AdamW with foreach.",
    ),
    compile_mode: str | None = typer.Option(
        None,
        "--compile",
        help="Also measure every mode torch.compile can run, compiled in this mode (default, reduce-overhead, "
        "...), beside the eager ones; compiled rows are ratios to compiled SGDM.",
    ),
) -> None:
    """SGDM, AdamW, timm's Adahessian and SGD-PH in every mode (estimator × engine × hessian_every 1, 10)."""
    import timm

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device not in ("cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda, but torch sees no CUDA device: use --device cpu")
    if not timm.is_model(model):
        close = timm.list_models(f"*{model.split('_')[0]}*")[:3]
        raise UserError(f"unknown model {model!r}" + (f"; did you mean {', '.join(close)}?" if close else ""))
    for name, value in (
        ("--batch", batch),
        ("--img-size", img_size),
        ("--steps", steps),
        ("--num-classes", num_classes),
        ("--rounds", rounds),
    ):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    if compile_mode is not None and compile_mode not in COMPILE_MODES:
        raise UserError(
            f"--compile {compile_mode!r} is not a torch.compile mode: use one of {', '.join(COMPILE_MODES)}"
        )
    if host:
        _host_overhead(model, json_out, compile_mode)
        return
    try:
        intervals = tuple(int(k) for k in every.split(","))
    except ValueError:
        raise UserError(f"--every takes refresh intervals as integers, e.g. 1,2,5,10; got {every!r}") from None
    if any(k < 1 for k in intervals):
        raise UserError(f"--every: each interval must be at least 1, got {every!r}")
    modes = all_modes(intervals)
    if only:
        modes = [m for m in modes if m.optimizer == "sgdm" or any(fnmatch.fnmatch(m.label, p) for p in only)]
        if len(modes) == 1:
            labels = ", ".join(m.label for m in all_modes(intervals))
            raise UserError(f"--only {' '.join(only)!r} matches no mode; the modes are: {labels}")
    if compile_mode is not None:
        modes += compiled_modes(modes, compile_mode)
    settings = Settings(
        model=model,
        batch=batch,
        img_size=img_size,
        num_classes=num_classes,
        steps=steps,
        device=device,
        threads=threads,
        window=timing_window(modes, device),
    )
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {threads or torch.get_num_threads()} threads"
    console.print(
        f"{model}, batch {batch} of {img_size}x{img_size}, {num_classes} classes, {where}, torch {torch.__version__}; "
        f"per mode {settings.windows} timed window(s) of {settings.window} steps"
    )
    with console.status("measuring") as status:
        records = run(
            modes,
            settings,
            rounds,
            on_result=lambda mode, r: status.update(f"measured {mode.label}: {r['time_ratio']:.2f}x"),
        )
    table = Table(
        title=f"step time (median over windows) and peak memory, ratios to SGDM in this run "
        f"(medians of {rounds} round(s))",
        title_justify="left",
    )
    for column in ("optimizer", "step ms", "time / SGDM", "per round", "peak MB", "memory / SGDM"):
        table.add_column(column)
    for r in records:
        label = Mode(**{k: r[k] for k in Mode.__dataclass_fields__}).label
        memory = f"{r['memory_ratio']:.2f}" if r["memory_ratio"] is not None else "-"
        spread = " ".join(f"{x:.2f}" for x in r["time_ratio_rounds"])
        table.add_row(label, f"{r['step_ms']:.1f}", f"{r['time_ratio']:.2f}", spread, f"{r['peak_mb']:.0f}", memory)
    console.print(table)
    if json_out is not None:
        write_json(json_out, "bench", records, settings=asdict(settings), rounds=rounds, torch=torch.__version__)
        console.print(f"wrote {json_out}")


def _host_overhead(model: str, json_out: Path | None, compile_mode: str | None) -> None:
    console.print(f"{model}: host time of optimizer.step() alone, one thread, torch {torch.__version__}")
    records = host_overhead(model, compile_mode=compile_mode)
    table = Table(title="median of 300 steps, ratio to SGD (foreach) in this run", title_justify="left")
    for column in ("optimizer", "step µs", "time / SGD"):
        table.add_column(column)
    for r in records:
        table.add_row(r["optimizer"], f"{r['step_us']:.0f}", f"{r['ratio']:.2f}")
    console.print(table)
    console.print(f"{records[0]['tensors']} tensors, {records[0]['second_order']} of them second-order")
    if json_out is not None:
        write_json(json_out, "bench-host", records, model=model, torch=torch.__version__)
        console.print(f"wrote {json_out}")
