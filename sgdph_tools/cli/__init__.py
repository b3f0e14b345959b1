"""The ``sgdph`` command line: one module per command, registered on one typer app.

Errors: usage errors are typer's (exit code 2). A :class:`~sgdph_tools.errors.UserError` is printed
as one line on stderr with exit code 2, any other exception as one line with exit code 1;
``SGDPH_DEBUG=1`` shows the full traceback instead.
"""

from __future__ import annotations

import os
import re
import sys

from . import bench, convert, export, hessian, inspect, recipes, report, sweep, train  # noqa: F401  (each registers its command on the app)
from .app import app


def main() -> None:
    from ..errors import UserError

    try:
        app()  # standalone mode: typer handles --help, usage errors and exits itself
    except UserError as exc:
        if os.environ.get("SGDPH_DEBUG"):
            raise
        print(f"error: {one_line(str(exc))}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:  # an unexpected failure: still one line, traceback on request
        if os.environ.get("SGDPH_DEBUG"):
            raise
        print(
            f"error: {type(exc).__name__}: {one_line(str(exc))} (set SGDPH_DEBUG=1 for the traceback)", file=sys.stderr
        )
        sys.exit(1)


def one_line(text: str) -> str:
    """A message as one line without terminal escape codes (a library's message may carry both)."""
    text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)
    return " ".join(text.split())
