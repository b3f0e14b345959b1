"""``sgdph bench`` end to end on a tiny model (the figures in docs/benchmarks.md come from real sizes)."""

from __future__ import annotations

from sgdph_tools.records import read_json
from tests.cli.helpers import invoke, sgdph, user_error

FIELDS = {
    "optimizer",
    "estimator",
    "engine",
    "hessian_every",
    "gnb_fraction",
    "full_forward",
    "rule",
    "cg_iters",
    "compiled",
    "time_ratio_rounds",
    "step_ms",
    "peak_mb",
    "time_ratio",
    "memory_ratio",
}

# A tiny model and batch on one thread: the command end to end, not a measurement.
TINY = ("bench", "--model", "small_cnn", "--batch", "8", "--img-size", "8", "--num-classes", "3", "--threads", "1")


def test_bench_measures_every_mode_against_sgdm(tmp_path):
    out = tmp_path / "bench.json"
    result = sgdph(*TINY, "--steps", "2", "--json", str(out))
    assert result.returncode == 0, result.stderr
    records = read_json(out, "bench")["records"]
    assert all(set(r) == FIELDS for r in records)
    assert [r["optimizer"] for r in records[:3]] == ["sgdm", "adamw", "adahessian"]
    assert records[0]["time_ratio"] == 1.0 and records[0]["estimator"] is None
    sgdph_modes = {
        (r["estimator"], r["engine"], r["hessian_every"], r["gnb_fraction"], r["full_forward"])
        for r in records
        if r["optimizer"] == "sgdph" and r["rule"] is None
    }
    assert len(sgdph_modes) == 18 and ("rowsum", "finite_difference", 1, None, True) in sgdph_modes
    blocks = {(r["hessian_every"], r["gnb_fraction"]) for r in records if r["rule"] == "block_newton"}
    assert blocks == {(1, 0.25), (10, 0.25)}
    sgdph_modes = {m[:4] for m in sgdph_modes}
    assert ("gnb", None, 10, None) in sgdph_modes and ("gnb", None, 1, 0.25) in sgdph_modes
    assert ("rowsum", "gauss_newton", 1, None) in sgdph_modes
    for r in records:
        assert r["step_ms"] > 0 and r["time_ratio"] > 0 and len(r["time_ratio_rounds"]) == 1
        assert abs(r["time_ratio"] - r["step_ms"] / records[0]["step_ms"]) < 1e-9
    assert "sgdph gnb, every 10" in result.stdout and "sgdph gnb, batch x 0.25, every 1" in result.stdout
    assert "sgdph rowsum, finite_difference, full forward, every 1" in result.stdout
    assert "sgdph block_newton, gnb" in result.stdout
    (hf,) = [r for r in records if r["optimizer"] == "block_hf"]  # the block-diagonal Hessian-free baseline
    assert (hf["cg_iters"], hf["gnb_fraction"]) == (10, 0.25)
    assert "block_hf, cg 10, curvature batch x 0.25" in result.stdout


def test_bench_only_measures_the_modes_asked_for_and_sgdm(tmp_path):
    out = tmp_path / "bench.json"
    result = sgdph(
        *TINY,
        "--steps",
        "1",
        "--only",
        "sgdph gnb*every 1",
        "--only",
        "adamw",
        "--json",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    records = read_json(out, "bench")["records"]
    assert [(r["optimizer"], r["gnb_fraction"]) for r in records] == [
        ("sgdm", None),
        ("adamw", None),
        ("sgdph", None),
        ("sgdph", 0.25),
    ]
    message = user_error("bench", "--model", "small_cnn", "--only", "lbfgs")
    assert "matches no mode" in message and "sgdph gnb, every 1" in message


def test_bench_rejects_bad_input_in_one_line():
    message = user_error("bench", "--model", "resnet18_cifarr")
    assert "unknown model 'resnet18_cifarr'" in message and "resnet18_cifar" in message
    assert "--steps must be at least 1" in user_error("bench", "--steps", "0", "--model", "small_cnn")


def test_bench_host_times_the_step_alone_against_sgd(tmp_path):
    out = tmp_path / "host.json"
    result = invoke("bench", "--host", "--model", "small_cnn", "--json", str(out))
    assert result.exit_code == 0, result.output
    records = read_json(out, "bench-host")["records"]
    assert [r["optimizer"] for r in records] == [
        "sgd (foreach)",
        "adamw (foreach)",
        "sgdph, between refreshes",
        "sgdph, between refreshes, per tensor",
    ]
    assert records[0]["ratio"] == 1.0 and all(r["step_us"] > 0 for r in records)
    assert 0 < records[0]["second_order"] < records[0]["tensors"]
    assert "time / SGD" in result.output


def test_bench_every_takes_integer_intervals():
    assert "--every takes refresh intervals as integers" in user_error(*TINY, "--every", "1,x")
    assert "each interval must be at least 1" in user_error(*TINY, "--every", "0,10")


def test_bench_puts_compiled_modes_beside_the_eager_ones_against_compiled_sgdm(tmp_path):
    out = tmp_path / "compiled.json"
    only = ("--only", "sgdph gnb, batch x 0.25, every 10")
    result = sgdph(*TINY, *only, "--every", "10", "--steps", "10", "--compile", "default", "--json", str(out))
    assert result.returncode == 0, result.stderr
    records = read_json(out, "bench")["records"]
    assert [(r["optimizer"], r["compiled"]) for r in records] == [
        ("sgdm", None),
        ("sgdph", None),
        ("sgdm", "default"),
        ("sgdph", "default"),
    ]
    assert records[0]["time_ratio"] == 1.0 and records[2]["time_ratio"] == 1.0  # each against its own SGDM
    assert "compiled (default)" in result.stdout
    assert "not a torch.compile mode" in user_error(*TINY, "--compile", "fast")
