"""Output helpers shared by the commands: one rich console, tables, JSON."""

from __future__ import annotations

from collections import Counter
from typing import Any

import torch.nn as nn
from rich.console import Console
from rich.table import Table

from ..records import dumps
from ..tagging import FIRST_ORDER, SECOND_ORDER, tag_parameters

# Wide enough for the tables when the output is not a terminal (rich would assume 80 columns).
console = Console(highlight=False, width=None if Console().is_terminal else 160)


def print_json(kind: str, records: list[Any], **metadata: Any) -> None:
    """Machine-readable output: the records in the project's JSON envelope on stdout, nothing else."""
    print(dumps(kind, records, **metadata))


def parameter_rows(model: nn.Module) -> list[dict]:
    params = dict(model.named_parameters())
    return [
        {
            "name": name,
            "shape": list(tag.shape),
            "kind": tag.kind,
            "group": tag.group,
            "numel": params[name].numel(),
            "reason": tag.reason,
        }
        for name, tag in tag_parameters(model).items()
    ]


def parameter_totals(rows: list[dict]) -> dict:
    totals = {}
    for group in (SECOND_ORDER, FIRST_ORDER):
        members = [r for r in rows if r["group"] == group]
        totals[group] = {"tensors": len(members), "numel": sum(r["numel"] for r in members)}
    totals["kinds"] = dict(Counter(r["kind"] for r in rows))
    totals["all"] = {"tensors": len(rows), "numel": sum(r["numel"] for r in rows)}
    return totals


def parameter_table(rows: list[dict], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for column, justify in (
        ("name", "left"),
        ("shape", "left"),
        ("kind", "left"),
        ("group", "left"),
        ("numel", "right"),
    ):
        table.add_column(column, justify=justify)
    for r in rows:
        style = "cyan" if r["group"] == SECOND_ORDER else None
        table.add_row(r["name"], str(tuple(r["shape"])), r["kind"], r["group"], f"{r['numel']:,}", style=style)
    return table


def totals_table(totals: dict) -> Table:
    table = Table(title="totals", title_justify="left")
    table.add_column("group")
    table.add_column("tensors", justify="right")
    table.add_column("parameters", justify="right")
    for group in (SECOND_ORDER, FIRST_ORDER, "all"):
        t = totals[group]
        table.add_row(group, str(t["tensors"]), f"{t['numel']:,}")
    return table


def layer_table(report) -> Table:
    table = Table(title="conv/linear layers", title_justify="left")
    for column in ("layer", "type", "action", "evidence", "why"):
        table.add_column(column, overflow="fold")
    for layer in report.layers:
        table.add_row(layer.name, layer.layer_type, layer.action, layer.evidence, layer.detail)
    return table


def summary_line(report) -> str:
    counts = report.counts()
    parts = [f"{n} {action}" for action, n in sorted(counts.items(), key=lambda kv: -kv[1])]
    return f"{len(report.layers)} conv/linear layers: " + ", ".join(parts)
