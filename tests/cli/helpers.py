"""Running the CLI: in-process (typer's runner) for speed, or as a real process for exit codes."""

from __future__ import annotations

import os
import subprocess
import sys

from typer.testing import CliRunner

from sgdph_tools.cli import app

runner = CliRunner()


def invoke(*args: str, cwd=None):
    """In-process run; exceptions are left in result.exception."""
    if cwd is None:
        return runner.invoke(app, list(args), catch_exceptions=True)
    old = os.getcwd()
    os.chdir(cwd)
    try:
        return runner.invoke(app, list(args), catch_exceptions=True)
    finally:
        os.chdir(old)


def sgdph(*args: str, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    """The real ``sgdph`` entry point in a subprocess (exit codes, stderr, no traceback)."""
    return subprocess.run(
        [sys.executable, "-m", "sgdph_tools", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**os.environ, **(env or {})},
        timeout=timeout,
    )
