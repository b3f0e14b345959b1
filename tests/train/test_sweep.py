"""``sgdph sweep``: the grid, the folder, resumption, divergence, and the report over a sweep."""

from __future__ import annotations

import shutil

import pytest
import yaml

from sgdph_tools.errors import UserError
from sgdph_tools.recipe import load_recipe
from sgdph_tools.records import read_json
from sgdph_tools.train import Trainer
from sgdph_tools.train.metrics import read_metrics
from sgdph_tools.train.sweep import config_name, parse_axes, parse_seeds, plan, split_values, threads_per_job
from tests.cli.helpers import invoke, sgdph


def test_values_seeds_and_names():
    assert split_values("[0.9,0.99],[0.9,0.999]") == ["[0.9,0.99]", "[0.9,0.999]"]
    assert parse_axes(["optimizer.betas=[0.9,0.99],[0.9,0.999]", "optimizer.lr=1e-3,0.1"]) == [
        ("optimizer.betas", [[0.9, 0.99], [0.9, 0.999]]),
        ("optimizer.lr", [0.001, 0.1]),
    ]
    assert parse_seeds("0-3") == [0, 1, 2, 3] and parse_seeds("0,2,5-6") == [0, 2, 5, 6]
    for bad in ("3-1", "a", "0,0"):
        with pytest.raises(UserError, match="--seeds"):
            parse_seeds(bad)
    with pytest.raises(UserError, match="--seeds"):
        parse_axes(["trainer.seed=0,1"])
    with pytest.raises(UserError, match="unbalanced"):
        parse_axes(["optimizer.betas=[0.9,0.99"])
    with pytest.raises(UserError, match="given twice"):
        parse_axes(["optimizer.lr=1", "optimizer.lr=2"])
    assert config_name({"optimizer.lr": 0.1, "optimizer.weight_decay": 5e-4}) == "lr0.1-weight_decay0.0005"
    assert config_name({"optimizer.eps": 1e-8, "model.kwargs.eps": 2}) == "optimizer_eps1.0e-08-model_kwargs_eps2"
    runs = plan(parse_axes(["optimizer.lr=0.1,0.01"]), [0, 1])
    assert [r.name for r in runs] == ["lr0.1-s0", "lr0.1-s1", "lr0.01-s0", "lr0.01-s1"]
    assert threads_per_job(2, cpus=2) == 1 and threads_per_job(3, cpus=2) == 1 and threads_per_job(1, cpus=16) == 16


def tiny_recipe(tmp_path, epochs=1):
    path = tmp_path / "tiny.yaml"
    path.write_text(
        yaml.safe_dump(
            {
                "model": {"name": "small_cnn"},
                "data": {"name": "digits"},
                "optimizer": {"name": "sgd", "lr": 0.05, "weight_decay": 5e-4},
                "schedule": {"name": "constant"},
                "trainer": {"epochs": epochs, "batch_size": 128, "log_every": 2},
            }
        )
    )
    return path


@pytest.mark.slow
def test_a_sweep_trains_its_grid_once_and_a_second_call_trains_nothing(tmp_path):
    recipe, folder = tiny_recipe(tmp_path), tmp_path / "sweep"
    args = ("sweep", str(recipe), "optimizer.lr=0.05,0.02", "--seeds", "0-1", "--jobs", "2", "--dir", str(folder))
    first = sgdph(*args)
    assert first.returncode == 0, first.stderr
    assert "4 runs (2 configurations x 2 seeds); 0 finished, 0 diverged, 4 to train" in first.stdout
    manifest = read_json(folder / "sweep.json", "sweep")["records"]
    assert sorted(r["name"] for r in manifest) == ["lr0.02-s0", "lr0.02-s1", "lr0.05-s0", "lr0.05-s1"]
    assert all(r["status"] == "done" and "val_acc1" in r["final"] for r in manifest)
    for r in manifest:
        saved = yaml.safe_load((folder / r["name"] / "recipe.yaml").read_text())
        assert (saved["optimizer"]["lr"], saved["trainer"]["seed"]) == (r["config"]["optimizer.lr"], r["seed"])
        assert (folder / r["name"] / "log.txt").read_text().count("epoch 1/1") == 1
    stamps = {p: p.stat().st_mtime_ns for p in folder.glob("*/last.pt")}
    second = sgdph(*args)
    assert second.returncode == 0 and "4 finished, 0 diverged, 0 to train" in second.stdout
    assert {p: p.stat().st_mtime_ns for p in folder.glob("*/last.pt")} == stamps
    report = invoke("report", str(folder), "--json", "-")
    assert report.exit_code == 0, report.output
    groups = yaml.safe_load(report.output)["records"]  # JSON is YAML
    assert sorted(g["runs"] for g in groups) == [2, 2]
    best = invoke(
        "report", str(folder), "--best", "--json", str(tmp_path / "best.json"), "--plot", str(tmp_path / "lr.png")
    )
    assert best.exit_code == 0, best.output
    rows = read_json(tmp_path / "best.json", "selection")["records"]
    assert len(rows) == 2 and sum(r["best"] for r in rows) == 1 and all(r["seeds"] == [0, 1] for r in rows)
    assert {r["config"]["optimizer.lr"] for r in rows} == {0.05, 0.02} and (tmp_path / "lr.png").is_file()
    other = tmp_path / "other.yaml"
    other.write_text(recipe.read_text().replace("epochs: 1", "epochs: 2"))
    refused = invoke("sweep", str(other), "--dir", str(folder))
    assert isinstance(refused.exception, UserError) and "holds a sweep of another base recipe" in str(refused.exception)


def test_the_base_recipe_compares_on_the_settings_a_run_uses(tmp_path):
    # An SGDM sweep recorded before the default estimator changed holds estimator: rowsum and
    # gnb_fraction: null in its base.yaml; SGDM uses neither, so today's same recipe continues it.
    # A key SGDM does use still tells the two apart.
    from sgdph_tools.train.sweep import Sweep

    recipe, folder = tiny_recipe(tmp_path), tmp_path / "sweep"
    Sweep(folder, recipe, [])
    recorded = yaml.safe_load((folder / "base.yaml").read_text())
    assert recorded["optimizer"]["estimator"] == "gnb"  # today's default, unused by SGDM
    recorded["optimizer"].update(estimator="rowsum", gnb_fraction=None, rule="paper")
    (folder / "base.yaml").write_text(yaml.safe_dump(recorded))
    Sweep(folder, recipe, [])  # no error: the same experiment
    recorded["optimizer"]["momentum"] = 0.5
    (folder / "base.yaml").write_text(yaml.safe_dump(recorded))
    with pytest.raises(UserError, match="holds a sweep of another base recipe"):
        Sweep(folder, recipe, [])


class Interrupt(Exception):
    pass


@pytest.mark.slow
def test_an_interrupted_run_continues_and_a_diverged_one_is_not_retried(tmp_path):
    recipe, folder = tiny_recipe(tmp_path, epochs=2), tmp_path / "sweep"
    # Interrupt lr0.05-s0 after its first epoch, as a killed sweep would leave it.
    (run,) = plan(parse_axes(["optimizer.lr=0.05"]), [0])
    trainer = Trainer(load_recipe(recipe, run.overrides(folder)))
    trainer.on_epoch_end.append(lambda epoch, row: (_ for _ in ()).throw(Interrupt()))
    with pytest.raises(Interrupt):
        trainer.run()
    assert [r["epoch"] for r in read_metrics(folder / run.name / "metrics.jsonl")] == [1]
    # the sweep folder moves before it is continued: the location is not the run
    shutil.move(folder, tmp_path / "moved")
    folder = tmp_path / "moved"
    args = ("sweep", str(recipe), "optimizer.lr=0.05,1e9", "--dir", str(folder))
    first = sgdph(*args)
    assert first.returncode == 0, first.stderr
    log = (folder / "lr0.05-s0" / "log.txt").read_text()
    assert "resumed" in log and "after epoch 1" in log
    assert [r["epoch"] for r in read_metrics(folder / "lr0.05-s0" / "metrics.jsonl")] == [1, 2]
    statuses = {r["name"]: r["status"] for r in read_json(folder / "sweep.json", "sweep")["records"]}
    assert statuses == {"lr0.05-s0": "done", "lr1000000000.0-s0": "diverged"}
    assert "diverged  lr1000000000.0-s0" in first.stdout
    again = sgdph(*args)
    assert again.returncode == 0 and "1 finished, 1 diverged, 0 to train" in again.stdout


@pytest.mark.parametrize("key", ["trainer.threads", "trainer.name", "trainer.output_dir"])
def test_an_axis_on_a_key_the_sweep_sets_itself_is_refused(key):
    with pytest.raises(UserError, match=f"sweep axis {key}: the sweep"):
        parse_axes([f"{key}=1,2"])
