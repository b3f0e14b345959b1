"""One writer per folder: a run folder (``sgdph train``) or a sweep folder (``sgdph sweep``).

The lock is a file, ``.lock``, created exclusively, holding the owner's process id and host. A second
writer is refused with one line naming the owner. A lock whose process is gone (on this host) is
stale -- a kill -9 skips the release -- and is taken over, with a notice. On another host the owner
cannot be checked: the message says which file to remove if that process is known to be gone.
"""

from __future__ import annotations

import json
import os
import socket
import time
import weakref
from pathlib import Path

from ..errors import UserError

LOCK = ".lock"


class FolderLock:
    def __init__(self, folder: Path, what: str, fix: str):
        self.path, self.what, self.fix = Path(folder) / LOCK, what, fix
        self.held = False
        self._finalizer = weakref.finalize(self, _release, self.path, os.getpid())

    def acquire(self) -> FolderLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = _read(self.path)
                if _stale(owner):
                    self.path.unlink(missing_ok=True)
                    if owner.get("pid") != os.getpid():
                        print(f"taking over {self.path}: its process {owner.get('pid')} is gone", flush=True)
                    continue
                since = time.strftime("%Y-%m-%d %H:%M", time.localtime(owner.get("started", 0)))
                raise UserError(
                    f"{self.path.parent} is in use by {self.what} process {owner.get('pid')} on "
                    f"{owner.get('host')} (since {since}): {self.fix}; if that process is gone, remove {self.path}"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "started": time.time()}, f)
            self.held = True
            return self
        raise UserError(f"cannot take the lock {self.path}: another process keeps taking it")

    def release(self) -> None:
        if self.held:
            _release(self.path, os.getpid())
            self.held = False


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # unreadable (cut short by a kill mid-write): stale


def _stale(owner: dict) -> bool:
    if owner.get("host") not in (None, socket.gethostname()):
        return False  # another machine's process: cannot tell
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():  # unreadable, or this process's own earlier lock
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _release(path: Path, pid: int) -> None:
    if _read(path).get("pid") == pid and os.getpid() == pid:
        path.unlink(missing_ok=True)
