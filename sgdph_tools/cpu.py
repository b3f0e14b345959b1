"""How many CPU threads a training process should use.

torch's default is one thread per core of the machine. In a container limited to 2 CPUs on a large
host, or with several processes (``--nproc``, a sweep's ``--jobs``) on one machine, that
oversubscribes the CPUs and training runs 25-50x slower (measured on this project's machines).
The count here starts from the CPUs this process may really use -- its affinity mask, capped by the
cgroup CPU quota -- and splits them between the processes that share them. DataLoader workers need
no share: torch runs each with one thread, and with in-memory data they mostly wait.
"""

from __future__ import annotations

import math
import os
from pathlib import Path


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (e.g. 2.0), or None when there is none."""
    v2 = root / "cpu.max"  # cgroup v2: "max 100000" or "200000 100000"
    try:
        if v2.is_file():
            quota, period = v2.read_text().split()[:2]
            return None if quota == "max" else int(quota) / int(period)
        v1 = root / "cpu" / "cpu.cfs_quota_us"
        if v1.is_file():
            quota = int(v1.read_text())
            period = int((root / "cpu" / "cpu.cfs_period_us").read_text())
            return None if quota <= 0 else quota / period
    except (OSError, ValueError):
        return None
    return None


def usable_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by the cgroup quota (at least 1)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, max(1, math.floor(limit)))
    return max(1, cpus)


def threads_per_process(processes: int = 1, cpus: int | None = None) -> int:
    """Threads for each of ``processes`` processes that share this machine's usable CPUs."""
    cpus = usable_cpus() if cpus is None else cpus
    return max(1, cpus // max(1, processes))
