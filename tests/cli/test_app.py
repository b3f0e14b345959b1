"""The installed ``sgdph`` entry point, run as a real process: what any command's error becomes
(each command's own bad-input messages are tested in-process, tests/cli/helpers.py:user_error)."""

from __future__ import annotations

import pytest

import sgdph_tools
from tests.cli.helpers import sgdph


def test_version_and_help():
    r = sgdph("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"sgdph-tools {sgdph_tools.__version__}"
    r = sgdph("--help")
    assert r.returncode == 0 and "Usage" in r.stdout


def test_unknown_command_is_a_usage_error_without_traceback():
    r = sgdph("bogus")
    assert r.returncode == 2
    assert "No such command 'bogus'" in r.stderr and "Traceback" not in r.stderr


def test_a_user_error_is_one_line_with_exit_code_2_and_the_debug_variable_shows_the_traceback():
    r = sgdph("convert", "vgg19_nbn")
    assert r.returncode == 2
    assert r.stderr.startswith("error: unknown model 'vgg19_nbn'; did you mean 'vgg19_nobn'")
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    r = sgdph("convert", "vgg19_nbn", env={"SGDPH_DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr and "UserError: unknown model 'vgg19_nbn'" in r.stderr


def test_an_unexpected_failure_is_one_line_with_exit_code_1(monkeypatch, capsys):
    from sgdph_tools import cli

    def broken():
        raise RuntimeError("boom")

    monkeypatch.delenv("SGDPH_DEBUG", raising=False)
    monkeypatch.setattr(cli, "app", broken)
    with pytest.raises(SystemExit) as exited:
        cli.main()
    assert exited.value.code == 1
    assert capsys.readouterr().err == "error: RuntimeError: boom (set SGDPH_DEBUG=1 for the traceback)\n"
    monkeypatch.setenv("SGDPH_DEBUG", "1")
    with pytest.raises(RuntimeError, match="boom"):  # the traceback, on request
        cli.main()
