from __future__ import annotations

import json

import pytest
import yaml

from sgdph_tools.errors import UserError
from sgdph_tools.recipe import recipe_from_dict
from sgdph_tools.train.report import best_per_contender, load_run, plot_against_lr, plot_comparison, summarize


def fake_run(
    tmp_path,
    name,
    seed,
    accs,
    optimizer="sgdph",
    val_accs=None,
    lr=0.01,
    diverged=False,
    val_losses=None,
    epochs=None,
    **optimizer_keys,
):
    """A run folder as sgdph train writes it (recipe.yaml + metrics.jsonl [+ diverged.txt]); its recipe
    plans ``epochs`` (default: the epochs written, a finished run)."""
    trainer = {"seed": seed, "name": name, "epochs": epochs or len(accs)}
    recipe = recipe_from_dict({"optimizer": {"name": optimizer, "lr": lr, **optimizer_keys}, "trainer": trainer})
    folder = tmp_path / name
    folder.mkdir()
    (folder / "recipe.yaml").write_text(recipe.to_yaml())
    rows = [
        {
            "epoch": i + 1,
            "train_loss": 1.0 / (i + 1),
            "test_loss": 1.0,
            "test_acc1": a,
            "test_acc5": 99.0,
            "train_acc1": a,
            "lr": 0.1,
            "seconds": 1.0,
        }
        for i, a in enumerate(accs)
    ]
    for i, (row, v) in enumerate(zip(rows, val_accs or [])):
        row["val_acc1"] = v
        row["val_loss"] = val_losses[i] if val_losses else 2.0 - v / 100 - 0.01 * i  # later: a little lower
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if diverged:
        (folder / "diverged.txt").write_text("the training loss became non-finite\n")
    return folder


def test_runs_that_differ_only_by_seed_are_averaged(tmp_path):
    runs = [load_run(fake_run(tmp_path, f"ph-s{s}", s, accs)) for s, accs in ((0, [50, 70, 68]), (1, [55, 72, 74]))]
    runs.append(load_run(fake_run(tmp_path, "sgd-s0", 0, [60, 65], optimizer="sgd")))
    per_run, per_experiment = summarize(runs)
    assert [r["final_acc1"] for r in per_run] == [68, 74, 65]
    assert per_run[0]["test_acc1_at_best_val"] is None  # no validation: nothing is selected, least of all on test
    assert len(per_experiment) == 2
    ph = next(e for e in per_experiment if "sgdph" in e["experiment"])
    assert ph["runs"] == 2 and ph["seeds"] == [0, 1]
    assert ph["final_acc1_mean"] == 71.0 and round(ph["final_acc1_std"], 2) == 4.24  # sample std of 68 and 74
    assert ph["world_size"] == 1 and ph["distinct_seeds"] == 2 and ph["repeated_seeds"] == []
    plot_comparison(runs, tmp_path / "cmp.png")
    assert (tmp_path / "cmp.png").stat().st_size > 1000


def test_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(UserError, match="is not a run folder"):
        load_run(tmp_path)
    yaml.safe_dump({}, open(tmp_path / "recipe.yaml", "w"))
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="no finished epoch"):
        load_run(tmp_path)


def test_the_selected_epoch_is_the_best_on_validation_never_on_test(tmp_path):
    # test top-1 peaks at epoch 2 (80); validation peaks at epoch 3: epoch 3's test (60) is reported
    runs = [
        load_run(fake_run(tmp_path, f"ph-s{s}", s, [50, 80, 60, 55], val_accs=[40, 45, 70 + s, 50])) for s in (0, 1)
    ]
    per_run, per_experiment = summarize(runs)
    assert [(r["best_val_epoch"], r["best_val_acc1"], r["test_acc1_at_best_val"]) for r in per_run] == [
        (3, 70, 60),
        (3, 71, 60),
    ]
    assert (per_experiment[0]["test_acc1_at_best_val_mean"], per_experiment[0]["test_acc1_at_best_val_std"]) == (60, 0)
    assert (per_experiment[0]["final_acc1_mean"], per_experiment[0]["final_acc1_std"]) == (55, 0)


def test_a_run_recorded_before_a_key_existed_groups_with_newer_runs_at_its_default(tmp_path):
    old = fake_run(tmp_path, "old-s0", 0, [60])
    recorded = yaml.safe_load((old / "recipe.yaml").read_text())
    del recorded["optimizer"]["rule"]  # written before optimizer.rule existed: it ran the paper's rule
    (old / "recipe.yaml").write_text(yaml.safe_dump(recorded))
    runs = [load_run(old), load_run(fake_run(tmp_path, "new-s1", 1, [62], rule="paper"))]
    runs.append(load_run(fake_run(tmp_path, "damped-s0", 0, [64], rule="damped")))
    _, per_experiment = summarize(runs)
    assert sorted(len(e["seeds"]) for e in per_experiment) == [1, 2]


def test_best_per_contender_chooses_on_validation_and_counts_divergence(tmp_path):
    def grid(optimizer, lr, vals, tests, diverged_seed=None, **keys):
        return [
            load_run(
                fake_run(
                    tmp_path,
                    f"{optimizer}{keys}-lr{lr}-s{s}",
                    s,
                    [t],
                    optimizer,
                    [v],
                    lr=lr,
                    diverged=s == diverged_seed,
                    **keys,
                )
            )
            for s, (v, t) in enumerate(zip(vals, tests))
        ]

    runs = (
        grid("sgd", 0.1, [90, 92], [80, 82])  # best sgd on validation
        + grid("sgd", 0.01, [85, 85], [95, 95])  # best on test: must not be chosen
        # one seed diverged: scores 0 there
        + grid("sgdph", 0.1, [99, 99], [99, 99], diverged_seed=1, rule="paper", estimator="rowsum", hessian_every=1)
        + grid("sgdph", 0.01, [91, 91], [90, 88], rule="paper", estimator="rowsum", hessian_every=1)
        + grid("sgdph", 0.01, [93, 93], [91, 91], authors_code=True)  # another update rule: its own contender
    )
    rows = best_per_contender(runs)
    best = {r["optimizer"]: r for r in rows if r["best"]}
    assert set(best) == {"sgd", "sgdph rowsum paper", "sgdph rowsum authors"}
    assert best["sgd"]["config"]["optimizer.lr"] == 0.1 and best["sgd"]["test_mean"] == 81.0
    assert best["sgdph rowsum paper"]["config"]["optimizer.lr"] == 0.01  # 91 beats the diverging (99 + 0) / 2
    assert (best["sgdph rowsum paper"]["test_mean"], round(best["sgdph rowsum paper"]["test_std"], 3)) == (89.0, 1.414)
    diverging = next(r for r in rows if r["optimizer"] == "sgdph rowsum paper" and r["config"]["optimizer.lr"] == 0.1)
    assert diverging["diverged"] == 1 and diverging["val_mean"] == 49.5 and diverging["seeds"] == [0, 1]
    assert set(rows[0]["config"]) == {"optimizer.lr", "optimizer.name", "optimizer.authors_code", "optimizer.rule"}
    plot_against_lr(rows, tmp_path / "lr.png")
    assert (tmp_path / "lr.png").stat().st_size > 1000
    with pytest.raises(UserError, match="no validation set"):
        best_per_contender([load_run(fake_run(tmp_path, "noval", 0, [50]))])


def test_validation_ties_go_to_the_lower_validation_loss(tmp_path):
    run = load_run(
        fake_run(tmp_path, "tie", 0, [90, 91, 95, 92], val_accs=[80, 100, 100, 99], val_losses=[0.9, 0.5, 0.4, 0.3])
    )
    assert run.selected()["epoch"] == 3  # epochs 2 and 3 reach 100%; epoch 3 has the lower loss
    assert run.selected("val_loss")["epoch"] == 4  # the lowest loss alone


def test_groups_keep_world_size_apart_and_say_when_seeds_repeat(tmp_path):
    def with_world(folder, world):
        rows = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
        (folder / "metrics.jsonl").write_text("".join(json.dumps({**r, "world_size": world}) + "\n" for r in rows))
        return folder

    runs = [
        load_run(with_world(fake_run(tmp_path, "one-s0", 0, [60]), 1)),
        load_run(with_world(fake_run(tmp_path, "one-again-s0", 0, [64]), 1)),  # the same seed once more
        load_run(with_world(fake_run(tmp_path, "ddp-s0", 0, [62]), 2)),  # the same recipe on 2 processes
    ]
    _, per_experiment = summarize(runs)
    by_world = {e["world_size"]: e for e in per_experiment}
    assert set(by_world) == {1, 2}
    assert by_world[1]["runs"] == 2 and by_world[1]["distinct_seeds"] == 1 and by_world[1]["repeated_seeds"] == [0]
    assert by_world[2]["runs"] == 1 and by_world[2]["final_acc1_mean"] == 62
    assert json.loads(json.dumps(per_experiment)) == per_experiment  # numbers stay numbers in JSON


def test_an_unfinished_run_is_marked_and_left_out_of_the_means_unless_asked(tmp_path):
    done = [load_run(fake_run(tmp_path, f"ph-s{s}", s, [60, 70], val_accs=[60, 70])) for s in (0, 1)]
    stopped = load_run(fake_run(tmp_path, "ph-s2", 2, [20], val_accs=[20], epochs=2))  # stopped at epoch 1 of 2
    per_run, (experiment,) = summarize([*done, stopped])
    assert [r["unfinished"] for r in per_run] == [False, False, True]
    assert experiment["unfinished"] == 1 and experiment["final_acc1_mean"] == 70
    _, (included,) = summarize([*done, stopped], include_unfinished=True)
    assert included["final_acc1_mean"] == pytest.approx(160 / 3) and included["unfinished_included"]
    (row,) = best_per_contender([*done, stopped])
    assert row["seeds"] == [0, 1] and row["unfinished"] == 1 and row["test_mean"] == 70
