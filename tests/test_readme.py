"""The README's two fresh-machine commands stay true to what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def quick_start_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", section, flags=re.S)


def test_readme_shows_exactly_two_commands():
    main_job, tests = quick_start_commands()
    assert main_job.startswith("python3 -m venv .venv") and tests.startswith("python3 -m venv .venv")


def test_ci_runs_the_readme_test_command():
    _, tests = quick_start_commands()
    ci = (ROOT / ".ci" / "run").read_text()
    install, run = tests.split(" && ")[2:]
    assert f"{install.replace('pip install', 'pip install -q')}\n" in ci
    assert ci.rstrip().endswith(run)


def test_license_and_citation_are_shipped():
    import yaml

    assert "Apache License" in (ROOT / "LICENSE").read_text()
    citation = yaml.safe_load((ROOT / "CITATION.cff").read_text())
    assert citation["cff-version"] == "1.2.0" and citation["license"] == "Apache-2.0"
    assert "2403.02681" in citation["preferred-citation"]["url"]
    readme = (ROOT / "README.md").read_text()
    assert "## Citing" in readme and "arXiv:2403.02681" in readme
