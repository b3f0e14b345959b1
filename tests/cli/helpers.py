"""Running the CLI: in-process (typer's runner) for speed, or as a real process for exit codes.

A command's bad input is tested in-process with :func:`user_error` (the message, one line); what
the entry point makes of any such error -- exit code 2, ``error: ...`` on stderr, no traceback
unless ``SGDPH_DEBUG`` asks -- is tested once, as a real process, in tests/cli/test_app.py."""

from __future__ import annotations

import os
import subprocess
import sys

from typer.testing import CliRunner

from sgdph_tools.cli import app
from sgdph_tools.errors import UserError

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


def user_error(*args: str, cwd=None) -> str:
    """The message of the :class:`UserError` a command raises for bad input (asserted to be one line,
    which the entry point prints as ``error: <message>`` with exit code 2)."""
    result = invoke(*args, cwd=cwd)
    assert isinstance(result.exception, UserError), f"expected a UserError, got {result.exception!r}: {result.output}"
    message = str(result.exception)
    assert message and "\n" not in message, f"not one line: {message!r}"
    return message


def sgdph(*args: str, cwd=None, env=None, timeout=300) -> subprocess.CompletedProcess:
    """The real ``sgdph`` entry point in a subprocess (exit codes, stderr, no traceback). A developer's
    ``SGDPH_DEBUG`` is not inherited: pass it in ``env`` where a test wants the traceback."""
    return subprocess.run(
        [sys.executable, "-m", "sgdph_tools", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env={**{k: v for k, v in os.environ.items() if k != "SGDPH_DEBUG"}, **(env or {})},
        timeout=timeout,
    )
