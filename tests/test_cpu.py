"""CPU threads: the usable CPUs (affinity, cgroup quota) split between the processes that share them."""

from __future__ import annotations

from sgdph_tools.cpu import cgroup_cpu_limit, threads_per_process, usable_cpus


def test_cgroup_quota_v1_v2_and_none(tmp_path):
    assert cgroup_cpu_limit(tmp_path) is None  # no cgroup files: no quota
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 2.5
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(v1) is None
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("400000\n")
    assert cgroup_cpu_limit(v1) == 4.0
    (tmp_path / "cpu.max").write_text("garbage\n")
    assert cgroup_cpu_limit(tmp_path) is None  # unreadable: no quota rather than a crash


def test_threads_are_split_between_processes():
    assert [threads_per_process(p, cpus=8) for p in (1, 2, 3, 8, 16)] == [8, 4, 2, 1, 1]
    assert 1 <= threads_per_process() == usable_cpus()
