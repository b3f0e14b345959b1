"""`sgdph train --nproc 2`: torchrun, DDP with gloo on the CPU; the replicas must end identical."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sgdph_tools.train.metrics import read_metrics
from sgdph_tools.train.state import load_training_state
from tests.cli.helpers import sgdph

RECIPE = """\
# sgdph train recipe.yaml
model: {name: small_cnn, kwargs: {drop_rate: 0.1}}
data: {name: digits, num_workers: 0}
optimizer: {name: sgdph, lr: 0.01, weight_decay: 0.005, estimator: hutchinson}
schedule: {name: cosine}
trainer: {epochs: 2, batch_size: 64, progress: false}
"""


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["autograd", "finite_difference"])
def test_two_processes_end_identical(tmp_path, engine):
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    result = sgdph(
        "train",
        "recipe.yaml",
        "--nproc",
        "2",
        f"optimizer.engine={engine}",
        f"trainer.output_dir={tmp_path / 'runs'}",
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 process(es) (DDP) on cpu" in result.stdout
    rows = read_metrics(tmp_path / "runs" / "recipe-s0" / "metrics.jsonl")
    assert len(rows) == 2
    assert all(r["replicas_in_sync"] for r in rows)  # sha256 of every parameter and buffer, all-gathered
    assert rows[-1]["test_acc1"] > 80.0


def _processes_in(folder) -> list[int]:
    """PIDs of the processes whose working directory is ``folder`` (the launcher, torchrun, workers)."""
    pids = []
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            with contextlib.suppress(OSError):
                if os.readlink(proc / "cwd") == str(folder):
                    pids.append(int(proc.name))
    return pids


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM], ids=["SIGTERM"])  # SIGINT takes the same path (one launch less)
def test_a_signal_to_the_launcher_stops_every_process_and_the_run_resumes(tmp_path, sig):
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    run = tmp_path / "runs" / "recipe-s0"
    args = [sys.executable, "-m", "sgdph_tools", "train", "recipe.yaml", "--nproc", "2"]
    overrides = ["trainer.epochs=40", "optimizer.estimator=rowsum", f"trainer.output_dir={tmp_path / 'runs'}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launcher = subprocess.Popen(
        args + overrides, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 180
    while not (run / "last.pt").exists():  # one epoch done: a checkpoint to resume from
        assert launcher.poll() is None and time.monotonic() < deadline, launcher.stdout.read().decode()
        time.sleep(0.5)
    launcher.send_signal(sig)
    output = launcher.communicate(timeout=30)[0].decode()
    assert launcher.returncode == 128 + sig, output
    assert f"stopped by {sig.name}: every process ended; continue with --resume" in output
    time.sleep(1)
    assert _processes_in(tmp_path) == []  # no orphaned worker
    done = load_training_state(run / "last.pt")["epoch"]
    resumed = sgdph(
        *args[3:],
        *overrides[:-1],
        overrides[-1],
        f"trainer.epochs={done + 1}",
        "--resume",
        "--allow-changes",
        cwd=tmp_path,
        env={"OMP_NUM_THREADS": "1"},
    )
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, done + 2))


@pytest.mark.slow
def test_two_nodes_simulated_on_one_machine_then_resumed_on_one_process(tmp_path):
    """Two torchrun launchers, one process each, meeting at a c10d rendezvous on localhost: what
    `torchrun --nnodes 2` does on two machines. The checkpoint is written once, by global rank 0."""
    (tmp_path / "recipe.yaml").write_text(RECIPE)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "runs"
    node = [
        sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1",
        "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=sgdph-test",
        "-m", "sgdph_tools", "train", "recipe.yaml", "trainer.epochs=1", f"trainer.output_dir={out}",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launchers = [
        subprocess.Popen(node, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=240)[0].decode() for p in launchers]
    assert [p.returncode for p in launchers] == [0, 0], outputs
    (row,) = read_metrics(out / "recipe-s0" / "metrics.jsonl")
    assert row["world_size"] == 2 and row["replicas_in_sync"]
    assert load_training_state(out / "recipe-s0" / "last.pt")["world_size"] == 2
    # resumed on one process: refused unless asked for, then continued and recorded
    args = ("train", "recipe.yaml", f"trainer.output_dir={out}", "trainer.epochs=2", "--resume")
    refused = sgdph(*args, cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert refused.returncode == 2 and "trained on 2 process(es) and is resumed on 1" in refused.stderr
    resumed = sgdph(*args, "--allow-changes", cwd=tmp_path, env={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    (event,) = read_metrics(out / "recipe-s0" / "metrics.jsonl", events=True)
    assert event["changes"] == {"trainer.epochs": [1, 2], "world_size": [2, 1]}
