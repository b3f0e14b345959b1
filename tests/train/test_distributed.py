"""`sgdph train --nproc 2`: torchrun, DDP with gloo on the CPU; the replicas must end identical."""

from __future__ import annotations

import pytest

from sgdph_tools.train.metrics import read_metrics
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
    assert "2 process(es) on cpu" in result.stdout
    rows = read_metrics(tmp_path / "runs" / "recipe-s0" / "metrics.jsonl")
    assert len(rows) == 2
    assert all(r["replicas_in_sync"] for r in rows)  # sha256 of every parameter and buffer, all-gathered
    assert rows[-1]["test_acc1"] > 80.0
