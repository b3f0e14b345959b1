"""The project's user-facing error: one line that names the problem and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(ValueError):
    """A bad input (unknown name, unreadable file, invalid recipe...). The CLI prints its message
    as one line and exits non-zero, without a traceback. A ``ValueError``, so that a Python caller's
    ``except ValueError`` catches it as the API's documentation promises."""


def closest(name: str, choices: Iterable[str], n: int = 3) -> list[str]:
    """The valid names closest to ``name`` (for 'did you mean' hints)."""
    choices = list(choices)
    hits = difflib.get_close_matches(name, choices, n=n, cutoff=0.6)
    if not hits:  # fall back to substring matches: "resnet" -> "resnet18", "resnet50", ...
        hits = [c for c in choices if name.lower() in c.lower()][:n]
    return hits


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    hits = closest(name, choices)
    return f"; did you mean {', '.join(repr(h) for h in hits)}?" if hits else ""
