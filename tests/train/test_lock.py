"""One writer per run or sweep folder (sgdph_tools/train/lock.py), and the folder rules of a run:
an earlier run's files without last.pt are set aside, a moved folder resumes."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from sgdph_tools.errors import UserError
from sgdph_tools.train import Trainer
from sgdph_tools.train.lock import LOCK, FolderLock
from sgdph_tools.train.metrics import read_metrics
from tests.train.test_trainer import small_recipe


def test_a_second_writer_is_refused_while_the_first_lives_and_a_dead_ones_lock_is_taken_over(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; sys.stdin.read(); time.sleep(60)"],
        stdin=subprocess.PIPE,
    )
    try:
        (tmp_path / LOCK).write_text(json.dumps({"pid": holder.pid, "host": __import__("socket").gethostname()}))
        with pytest.raises(UserError, match=rf"in use by sgdph train process {holder.pid} .*choose another") as info:
            FolderLock(tmp_path, "sgdph train", "wait for it, or choose another trainer.name").acquire()
        assert "\n" not in str(info.value)
    finally:
        holder.kill()
        holder.wait()
    lock = FolderLock(tmp_path, "sgdph train", "wait").acquire()  # its process is gone: stale, taken over
    assert json.loads((tmp_path / LOCK).read_text())["pid"] != holder.pid
    lock.release()
    assert not (tmp_path / LOCK).exists()


@pytest.mark.slow
def test_a_run_locks_its_folder_sets_an_earlier_runs_files_aside_and_resumes_after_a_move(tmp_path, capsys):
    Trainer(small_recipe(tmp_path, "trainer.epochs=1")).run()
    assert not (tmp_path / "run" / LOCK).exists()  # released at the end
    # last.pt gone, the history left: a new run does not append to it
    (tmp_path / "run" / "last.pt").unlink()
    Trainer(small_recipe(tmp_path, "trainer.epochs=1")).run()
    (aside,) = (tmp_path / "run").glob("earlier-*")
    assert {p.name for p in aside.iterdir()} >= {"metrics.jsonl", "best.pt"}
    assert [r["epoch"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1]
    assert f"moved them to {aside}" in capsys.readouterr().out
    # the location is not the run: a renamed folder in another output folder resumes
    moved = tmp_path / "elsewhere"
    shutil.move(tmp_path / "run", moved / "renamed")
    rows = Trainer(small_recipe(moved, "trainer.epochs=2", name="renamed"), resume=True, allow_changes=True).run()
    assert [r["epoch"] for r in rows] == [1, 2]
    changes = read_metrics(moved / "renamed" / "metrics.jsonl", events=True)[0]["changes"]
    assert set(changes) == {"trainer.epochs"}  # not the output folder, not the name
