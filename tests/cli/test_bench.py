"""``sgdph bench`` end to end on a tiny model (the figures in docs/benchmarks.md come from real sizes)."""
from __future__ import annotations

import json

from tests.cli.helpers import sgdph

FIELDS = {"optimizer", "estimator", "engine", "hessian_every", "step_ms", "peak_mb", "time_ratio", "memory_ratio"}


def test_bench_measures_every_mode_against_sgdm(tmp_path):
    out = tmp_path / "bench.json"
    result = sgdph("bench", "--model", "small_cnn", "--batch", "8", "--img-size", "8", "--num-classes", "3",
                   "--steps", "2", "--threads", "1", "--json", str(out))
    assert result.returncode == 0, result.stderr
    records = json.loads(out.read_text())
    assert all(set(r) == FIELDS for r in records)
    assert [r["optimizer"] for r in records[:3]] == ["sgdm", "adamw", "adahessian"]
    assert records[0]["time_ratio"] == 1.0 and records[0]["estimator"] is None
    sgdph_modes = {(r["estimator"], r["engine"], r["hessian_every"]) for r in records if r["optimizer"] == "sgdph"}
    assert len(sgdph_modes) == 14 and ("gnb", None, 10) in sgdph_modes and ("rowsum", "gauss_newton", 1) in sgdph_modes
    for r in records:
        assert r["step_ms"] > 0 and r["time_ratio"] > 0
        assert abs(r["time_ratio"] - r["step_ms"] / records[0]["step_ms"]) < 1e-9
    assert "sgdph gnb, every 10" in result.stdout


def test_bench_rejects_bad_input_in_one_line():
    result = sgdph("bench", "--model", "resnet18_cifarr")
    assert result.returncode == 2 and "unknown model 'resnet18_cifarr'" in result.stderr
    assert "resnet18_cifar" in result.stderr and "Traceback" not in result.stderr
    result = sgdph("bench", "--steps", "0", "--model", "small_cnn")
    assert result.returncode == 2 and "--steps must be at least 1" in result.stderr
