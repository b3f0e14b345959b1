"""``sgdph hessian`` end to end: exact blocks in float64 against every estimator × engine."""

from __future__ import annotations

from sgdph_tools.records import read_json
from tests.cli.helpers import sgdph, user_error

# A small float64 report, written to the JSON file given after these arguments.
FLOAT64_REPORT = (
    "hessian",
    "small_cnn",
    "--batch",
    "8",
    "--img-size",
    "8",
    "--max-tensors",
    "2",
    "--max-channels",
    "4",
    "--draws",
    "3",
    "--dtype",
    "float64",
    "--json",
)


def test_in_float64_every_deterministic_estimate_meets_its_exact_target(tmp_path):
    out = tmp_path / "hessian.json"
    result = sgdph(*FLOAT64_REPORT, str(out))
    assert result.returncode == 0, result.stderr
    report = read_json(out, "hessian")
    assert [b["tensor"] for b in report["blocks"]] == ["features.0.1.weight", "features.0.1.bias"]
    assert all(b["channels"] == 4 and b["hessian_off_diagonal"] > 0.01 for b in report["blocks"])  # not diagonal
    rows = report["records"]
    assert len(rows) == 2 * 12  # 9 estimator x engine pairs, gnb on the batch, its half and its quarter
    assert sorted({r["gnb_fraction"] for r in rows if r["estimator"] == "gnb"}) == [0.25, 0.5, 1.0]
    for r in rows:
        if r["estimator"] in ("rowsum", "diagonal") and r["engine"] != "finite_difference":
            assert r["relative_error"] < 1e-8, r
        if r["estimator"] in ("rowsum", "diagonal") and r["engine"] == "finite_difference":
            assert r["cosine"] > 0.99, r  # float64: the step is too small to cross ReLU kinks
        if r["estimator"] in ("hutchinson", "gnb"):
            assert r["draws"] == 3  # convergence of the means: tests/test_gauss_newton.py, tests/test_hessian.py
    assert "estimates against their exact target" in result.stdout
    # Preconditioning: the exact block solves its own quadratic model best (efficiency 1, P⁻¹A = I); every
    # other model gets at most that, and each tensor lists SGD, the diagonals and the GNB blocks (1, 8, 8 chunks)
    models = {}
    for r in report["preconditioning"]:
        models.setdefault(r["tensor"], {})[r["model"]] = r
    assert set(models) == {"features.0.1.weight", "features.0.1.bias"}
    for per_model in models.values():
        assert abs(per_model["exact block"]["efficiency"] - 1) < 1e-9
        assert abs(per_model["exact block"]["condition"] - 1) < 1e-6
        assert all(0 < r["efficiency"] <= 1 + 1e-9 and r["condition"] >= 1 - 1e-9 for r in per_model.values())
        assert {
            "sgd (P = I)", "exact diagonal", "gnb block, 1 chunk", "gnb block, 8 chunks", "gnb block normalized (ε 0.1)"
        } <= set(per_model)  # fmt: skip
    # The same command again gives the same report: the model's initialisation is seeded too.
    again = tmp_path / "again.json"
    sgdph(*FLOAT64_REPORT, str(again))
    assert read_json(again, "hessian") == report


def test_bad_inputs_are_one_line_errors():
    assert "matches --layers '*nothing*'" in user_error("hessian", "small_cnn", "--layers", "*nothing*")
    assert "--dtype must be float32 or float64" in user_error("hessian", "small_cnn", "--dtype", "float16")
