"""The installed ``sgdph`` entry point, run as a real process."""

from __future__ import annotations

import subprocess
import sys

import sgdph_tools


def sgdph(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sgdph_tools", *args], capture_output=True, text=True, timeout=120)


def test_version_and_help():
    r = sgdph("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"sgdph-tools {sgdph_tools.__version__}"
    r = sgdph("--help")
    assert r.returncode == 0 and "Usage" in r.stdout


def test_unknown_command_is_a_usage_error_without_traceback():
    r = sgdph("bogus")
    assert r.returncode == 2
    assert "No such command 'bogus'" in r.stderr and "Traceback" not in r.stderr
