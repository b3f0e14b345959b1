"""The ``sgdph`` command line: one module per command, registered on one typer app.

Errors: usage errors are typer's (exit code 2). A :class:`~sgdph_tools.errors.UserError` is printed
as one line on stderr with exit code 2, any other exception as one line with exit code 1;
``SGDPH_DEBUG=1`` shows the full traceback instead.
"""

from __future__ import annotations

import os
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
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    except Exception as exc:  # an unexpected failure: still one line, traceback on request
        if os.environ.get("SGDPH_DEBUG"):
            raise
        print(f"error: {type(exc).__name__}: {exc} (set SGDPH_DEBUG=1 for the traceback)", file=sys.stderr)
        sys.exit(1)
