from __future__ import annotations

import json

import pytest
import yaml

from sgdph_tools.errors import UserError
from sgdph_tools.recipe import recipe_from_dict
from sgdph_tools.train.report import load_run, mean_std, plot_comparison, summarize


def fake_run(tmp_path, name, seed, accs, optimizer="sgdph"):
    """A run folder as sgdph train writes it (recipe.yaml + metrics.jsonl)."""
    recipe = recipe_from_dict({"optimizer": {"name": optimizer}, "trainer": {"seed": seed, "name": name}})
    folder = tmp_path / name
    folder.mkdir()
    (folder / "recipe.yaml").write_text(recipe.to_yaml())
    rows = [{"epoch": i + 1, "train_loss": 1.0 / (i + 1), "test_loss": 1.0, "test_acc1": a, "test_acc5": 99.0,
             "train_acc1": a, "lr": 0.1, "seconds": 1.0} for i, a in enumerate(accs)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


def test_runs_that_differ_only_by_seed_are_averaged(tmp_path):
    runs = [load_run(fake_run(tmp_path, f"ph-s{s}", s, accs)) for s, accs in ((0, [50, 70, 68]), (1, [55, 72, 74]))]
    runs.append(load_run(fake_run(tmp_path, "sgd-s0", 0, [60, 65], optimizer="sgd")))
    per_run, per_experiment = summarize(runs)
    assert [r["final_acc1"] for r in per_run] == [68, 74, 65] and per_run[0]["best_acc1"] == 70
    assert len(per_experiment) == 2
    ph = next(e for e in per_experiment if "sgdph" in e["experiment"])
    assert ph["runs"] == 2 and ph["seeds"] == [0, 1]
    assert ph["final_acc1"] == "71.00 ± 4.24"  # sample standard deviation of 68 and 74
    assert mean_std([1.5]) == "1.50"
    plot_comparison(runs, tmp_path / "cmp.png")
    assert (tmp_path / "cmp.png").stat().st_size > 1000


def test_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(UserError, match="is not a run folder"):
        load_run(tmp_path)
    yaml.safe_dump({}, open(tmp_path / "recipe.yaml", "w"))
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="no finished epoch"):
        load_run(tmp_path)
