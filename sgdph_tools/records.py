"""One convention for every JSON file and JSON output the tool writes: an envelope.

A JSON document is ``{"format": "sgdph-tools/<kind>", "version": N, "sgdph_tools_version": "...",
...metadata..., "records": [...]}``. A JSON Lines file (``metrics.jsonl``) starts with the same
envelope minus ``records`` on its first line; every later line is one record. Checkpoints follow
the same idea (``format``, ``version``, ``sgdph_tools_version``; :mod:`sgdph_tools.train.state`).

Readers name the kind and the versions they understand: anything else -- another kind, a newer
version, a file that is not an envelope -- is a :class:`~sgdph_tools.errors.UserError` that says what
the file is and what was expected. ``metrics.jsonl`` files of sgdph-tools 0.1.0, written before the
envelope, have no header line: they read as version 0.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

from .errors import UserError
from .io import atomic_write_text
from .version import __version__

#: The current version of each kind's records; bump a kind's when its records change incompatibly.
VERSIONS = {
    "metrics": 1,
    "report": 1,
    "selection": 1,
    "bench": 1,
    "bench-host": 1,
    "hessian": 1,
    "inspect": 1,
    "sweep": 1,
}


def _format(kind: str) -> str:
    if kind not in VERSIONS:
        raise ValueError(f"unknown record kind {kind!r}; known: {', '.join(VERSIONS)}")
    return f"sgdph-tools/{kind}"


def header(kind: str, **metadata: Any) -> dict[str, Any]:
    """The envelope without its records (the first line of a JSON Lines file)."""
    return {"format": _format(kind), "version": VERSIONS[kind], "sgdph_tools_version": __version__, **metadata}


def envelope(kind: str, records: list[Any], **metadata: Any) -> dict[str, Any]:
    return {**header(kind, **metadata), "records": records}


def check_header(data: Any, kind: str, source: str) -> dict[str, Any]:
    """``data``'s envelope fields, after checking it is ``kind`` in a version this reader knows."""
    expected = _format(kind)
    if not isinstance(data, dict) or "format" not in data:
        raise UserError(f"{source} is not a {expected} file (no format field): was it written by sgdph-tools?")
    if data["format"] != expected:
        raise UserError(f"{source} is a {data['format']} file, not the {expected} file expected here")
    version = data.get("version")
    if not isinstance(version, int) or not 0 <= version <= VERSIONS[kind]:
        raise UserError(
            f"{source} is {expected} version {version!r} (written by sgdph-tools "
            f"{data.get('sgdph_tools_version', '?')}); this sgdph-tools ({__version__}) reads versions up to "
            f"{VERSIONS[kind]}: upgrade sgdph-tools to read it"
        )
    return data


def dumps(kind: str, records: list[Any], **metadata: Any) -> str:
    return json.dumps(envelope(kind, records, **metadata), indent=2, default=str)


def write_json(path: str | os.PathLike, kind: str, records: list[Any], **metadata: Any) -> Path:
    """Write the envelope atomically (a temporary file renamed over ``path``)."""
    return atomic_write_text(dumps(kind, records, **metadata) + "\n", path)


def read_json(path: str | os.PathLike, kind: str) -> dict[str, Any]:
    """The envelope in ``path`` (``records`` and metadata), checked to be ``kind``."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise UserError(f"no such file: {path}") from None
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON (line {exc.lineno}): {exc.msg}") from None
    return check_header(data, kind, str(path))


# ----------------------------------------------------------------------------- JSON Lines


def append_jsonl(path: str | os.PathLike, kind: str, record: dict[str, Any]) -> None:
    """Append one record; a new or empty file gets the header line first."""
    path = Path(path)
    fresh = not path.is_file() or path.stat().st_size == 0
    with open(path, "a") as f:
        if fresh:
            f.write(json.dumps(header(kind)) + "\n")
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: str | os.PathLike, kind: str) -> list[dict[str, Any]]:
    """The records of a JSON Lines file (none if it does not exist). A file without a header line
    is version 0 (sgdph-tools 0.1.0 wrote them so)."""
    path = Path(path)
    if not path.is_file():
        return []
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    rows = []
    for number, line in enumerate(lines, 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if number == len(lines):  # a write cut short by a kill: the records before it are whole
                print(f"warning: {path}: skipped a torn last line (an interrupted write)", file=sys.stderr)
                break
            raise UserError(f"{path} is not valid JSON Lines: line {number}: {exc.msg}") from None
    if rows and isinstance(rows[0], dict) and "format" in rows[0]:
        check_header(rows[0], kind, str(path))
        return rows[1:]
    return rows  # version 0: no header


def rewrite_jsonl(path: str | os.PathLike, kind: str, records: list[dict[str, Any]]) -> None:
    """Replace the file's records atomically (with a current header)."""
    text = "".join(json.dumps(r) + "\n" for r in [header(kind), *records])
    atomic_write_text(text, path)
