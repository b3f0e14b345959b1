"""Writing files so that nothing is lost: a crash mid-write leaves the previous file intact.

Every writer of the project goes through :func:`atomic_save` or :func:`atomic_write_text`: the data
goes to a temporary file beside the target, then is renamed over it. What is at the path decides how:

- a regular file, or nothing: written atomically; a new file gets the permissions ``open()`` would give
  it (0666 less the umask), an existing one keeps its own;
- a symbolic link: its target is written (atomically), the link stays;
- a device, a FIFO, a socket (``-o /dev/null``): written through, as ``open()`` would -- a rename
  would replace the device node by a regular file;
- a folder: refused.

A folder that cannot be written, a full disk or a path that cannot be created give one line naming
the path (:class:`~sgdph_tools.errors.UserError`), never the temporary file's name.
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

from .errors import UserError


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to ``path`` (see the module docstring for what is at the path)."""
    return _write(Path(path), "wb", lambda f: torch.save(obj, f))


def atomic_write_text(text: str, path: str | os.PathLike) -> Path:
    return _write(Path(path), "w", lambda f: f.write(text))


def refuse_overwriting_input(output: str | os.PathLike, *inputs: str | os.PathLike, flag: str = "-o") -> None:
    """One line, before anything is written, when ``output`` is one of the command's input files."""
    out = Path(output)
    for given in inputs:
        source = Path(given)
        if out.exists() and source.exists() and os.path.samefile(out, source):
            raise UserError(f"{flag} {output} is the input file {given}: write the result to another path")


def _write(path: Path, mode: str, write: Callable[[IO], Any]) -> Path:
    target = Path(os.path.realpath(path)) if path.is_symlink() else path
    try:
        info = target.stat()
    except FileNotFoundError:
        info = None
    except OSError as exc:
        raise UserError(f"cannot write {path}: {exc.strerror}") from None
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise UserError(f"cannot write {path}: it is a folder; give a file name")
    try:
        if info is not None and not stat.S_ISREG(info.st_mode):  # a device, a FIFO: write through
            with open(target, mode) as f:
                write(f)
            return path
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise _user_error(path, exc) from None
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, stat.S_IMODE(info.st_mode) if info is not None else 0o666 & ~_umask())
        os.replace(tmp, target)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise _user_error(path, exc) from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _user_error(path: Path, exc: OSError) -> UserError:
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return UserError(f"cannot write {path}: the folder {path.parent} is not writable (permission denied)")
    if exc.errno == errno.ENOSPC:
        return UserError(f"cannot write {path}: no space left on the device; free some space and run again")
    return UserError(f"cannot write {path}: {exc.strerror or exc}")


def _umask() -> int:
    try:  # Linux says it without changing it
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0)  # elsewhere the only way to read it; set back at once
    os.umask(mask)
    return mask


def remove_stale_temporaries(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporaries an interrupted atomic write left in ``folder`` (``.NAME.*.tmp``; a
    kill -9 mid-write skips the cleanup above). Call it only where no other process writes now:
    the start or resume of the run that owns the folder. Returns what was removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.glob(".*.tmp") if p.is_file()]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
