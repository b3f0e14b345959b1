"""The trainer end to end, on real data (scikit-learn's digits) and real models, on the CPU."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from sgdph_tools.errors import UserError
from sgdph_tools.recipe import load_recipe, recipe_from_dict
from sgdph_tools.surgery.checkpoint import load_model
from sgdph_tools.train import Trainer
from sgdph_tools.train.loop import Diverged, DivergenceGuard, NonFiniteLoss
from sgdph_tools.train.metrics import read_metrics, validation_rank
from sgdph_tools.train.state import load_training_state

ROOT = Path(__file__).resolve().parents[2]
METRIC_KEYS = {
    "epoch",
    "train_loss",
    "val_loss",
    "val_acc1",
    "val_acc5",
    "test_loss",
    "test_acc1",
    "test_acc5",
    "lr",
    "seconds",
}


def small_recipe(tmp_path, *overrides, name="run"):
    return recipe_from_dict(
        {
            "model": {"name": "small_cnn", "kwargs": {"drop_rate": 0.2}},
            "data": {"name": "digits"},
            "optimizer": {"name": "sgdph", "lr": 0.01, "weight_decay": 5e-3},
            "schedule": {"name": "cosine"},
            "trainer": {"epochs": 3, "batch_size": 64, "output_dir": str(tmp_path), "name": name, "progress": False},
        },
        list(overrides),
    )


@pytest.mark.slow
def test_quickstart_recipe_reaches_95_percent(tmp_path):
    recipe = load_recipe(ROOT / "recipes" / "quickstart.yaml", [f"trainer.output_dir={tmp_path}"])
    rows = Trainer(recipe).run()
    run = tmp_path / recipe.trainer.name
    assert {p.name for p in run.iterdir()} >= {"recipe.yaml", "metrics.jsonl", "curves.png", "last.pt", "best.pt"}
    assert len(rows) == recipe.trainer.epochs and METRIC_KEYS <= rows[-1].keys()
    assert rows[-1]["test_acc1"] > 95.0
    assert [r["epoch"] for r in read_metrics(run / "metrics.jsonl")] == list(range(1, recipe.trainer.epochs + 1))
    # The checkpoint rebuilds the model (inspect/export read it); best.pt holds the best epoch on
    # validation (its weights give that epoch's validation accuracy again), never chosen on test.
    model, spec, _ = load_model(str(run / "best.pt"))
    best = load_training_state(run / "best.pt")
    chosen = max(rows, key=validation_rank)  # top-1, ties to the lower validation loss
    assert spec.name == "small_cnn" and best["best_val_acc1"] == chosen["val_acc1"] and best["epoch"] == chosen["epoch"]


class Interrupt(Exception):
    pass


@pytest.mark.parametrize(
    "options",
    [[], ["optimizer.estimator=rowsum"], ["optimizer.engine=finite_difference", "optimizer.estimator=hutchinson"]],
    ids=["default-gnb", "autograd-rowsum", "fd-hutchinson"],
)
def test_resume_matches_an_uninterrupted_run(tmp_path, options):
    full = Trainer(small_recipe(tmp_path, *options, name="full")).run()

    interrupted = Trainer(small_recipe(tmp_path, *options, name="cut"))

    def stop_after_first_epoch(epoch, row):
        if epoch == 0:
            raise Interrupt

    interrupted.on_epoch_end.append(stop_after_first_epoch)
    with pytest.raises(Interrupt):
        interrupted.run()
    assert load_training_state(tmp_path / "cut" / "last.pt")["epoch"] == 1
    resumed = Trainer(small_recipe(tmp_path, *options, name="cut"), resume=True).run()

    def strip_timing(rows):
        return [{k: v for k, v in r.items() if "second" not in k} for r in rows]

    assert strip_timing(resumed) == strip_timing(full)  # every metric of every epoch, exactly
    a = load_training_state(tmp_path / "full" / "last.pt")["state_dict"]
    b = load_training_state(tmp_path / "cut" / "last.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_different_recipe_and_a_fresh_run_refuses_an_old_folder(tmp_path):
    Trainer(small_recipe(tmp_path, "trainer.epochs=1")).run()
    with pytest.raises(UserError, match="already holds a run: continue it with --resume"):
        Trainer(small_recipe(tmp_path, "trainer.epochs=1"))
    with pytest.raises(UserError, match="the run being resumed differs in optimizer.lr: .*--allow-changes"):
        Trainer(small_recipe(tmp_path, "trainer.epochs=1", "optimizer.lr=0.5"), resume=True)
    with pytest.raises(UserError, match="nothing to resume"):
        Trainer(small_recipe(tmp_path, name="other"), resume=True)


def test_resume_may_change_the_safe_keys_with_allow_changes_and_records_the_change(tmp_path):
    Trainer(small_recipe(tmp_path, "trainer.epochs=1")).run()
    changed = ("trainer.epochs=2", "optimizer.lr=0.005", "trainer.grad_clip=1.0")
    with pytest.raises(UserError, match="in optimizer.lr, trainer.epochs, trainer.grad_clip: .*add --allow-changes"):
        Trainer(small_recipe(tmp_path, *changed), resume=True)
    for fixed, key in (("trainer.seed=1", "trainer.seed"), ("model.kwargs.drop_rate=0.1", "model.kwargs")):
        with pytest.raises(UserError, match=f"in {key}.*which define the run"):
            Trainer(small_recipe(tmp_path, *changed, fixed), resume=True, allow_changes=True)
    resumed = Trainer(small_recipe(tmp_path, *changed), resume=True, allow_changes=True)
    # the new lr reached the scheduler's base values, and the lr now follows the new 2-epoch cosine
    assert resumed.scheduler.base_lrs == pytest.approx([0.005] * len(resumed.optimizer.param_groups))
    assert [g["lr"] for g in resumed.optimizer.param_groups] == pytest.approx(
        [0.0025] * len(resumed.scheduler.base_lrs)
    )
    rows = resumed.run()
    assert [r["epoch"] for r in rows] == [1, 2] and rows[1]["lr"] == pytest.approx(0.0, abs=1e-12)
    (event,) = read_metrics(tmp_path / "run" / "metrics.jsonl", events=True)
    assert event == {
        "epoch": 1,
        "event": "resumed",
        "changes": {"optimizer.lr": [0.01, 0.005], "trainer.epochs": [1, 2], "trainer.grad_clip": [None, 1.0]},
    }


def test_resume_with_a_new_weight_decay_keeps_the_decay_of_the_1d_group(tmp_path):
    # weight_decay_1d gives the 1-D parameters their own group and decay; --allow-changes on
    # optimizer.weight_decay changes the other groups only
    Trainer(small_recipe(tmp_path, "trainer.epochs=1", "optimizer.name=sgd", "optimizer.weight_decay_1d=0")).run()
    changed = ("trainer.epochs=1", "optimizer.name=sgd", "optimizer.weight_decay_1d=0", "optimizer.weight_decay=0.05")
    resumed = Trainer(small_recipe(tmp_path, *changed), resume=True, allow_changes=True)
    decay = {all(p.ndim <= 1 for p in g["params"]): g["weight_decay"] for g in resumed.optimizer.param_groups}
    assert decay == {True: 0.0, False: 0.05}


def test_a_torn_metrics_line_and_stale_temporaries_left_by_a_kill_do_not_stop_resume_or_report(tmp_path, capsys):
    from sgdph_tools.train.report import load_run

    cut = Trainer(small_recipe(tmp_path, "trainer.epochs=2"))

    def stop_after_first_epoch(epoch, row):
        raise Interrupt

    cut.on_epoch_end.append(stop_after_first_epoch)
    with pytest.raises(Interrupt):
        cut.run()
    run = tmp_path / "run"
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"epoch": 2, "train_lo')  # killed mid-write
    (run / ".last.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")
    (run / ".recipe.yaml.x.tmp").write_text("model:")
    assert [r["epoch"] for r in load_run(run).rows] == [1]  # the report reads the whole lines
    assert "skipped a torn last line" in capsys.readouterr().err
    rows = Trainer(small_recipe(tmp_path, "trainer.epochs=2"), resume=True).run()
    assert [r["epoch"] for r in rows] == [1, 2]
    assert not list(run.glob(".*.tmp"))  # removed on resume
    f = run / "metrics.jsonl"
    lines = f.read_text().splitlines()
    f.write_text("\n".join([lines[0], "{torn", *lines[1:]]) + "\n")  # a bad line in the middle is an error
    with pytest.raises(UserError, match="not valid JSON Lines: line 2"):
        read_metrics(f)


def test_a_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = Trainer(small_recipe(tmp_path, "optimizer.name=sgd", "optimizer.lr=0.05"))

    def explode(epoch, row):  # after a good first epoch, make the weights infinite
        with torch.no_grad():
            trainer.model.fc.weight.fill_(float("inf"))

    trainer.on_epoch_end.append(explode)
    with pytest.raises(
        NonFiniteLoss, match=r"non-finite in epoch 2.*last good checkpoint is .*last.pt \(after epoch 1\)"
    ):
        trainer.run()
    state = load_training_state(tmp_path / "run" / "last.pt")
    assert state["epoch"] == 1 and all(
        torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point()
    )


def test_a_loss_that_explodes_but_stays_finite_stops_the_run_and_keeps_the_last_good_checkpoint(tmp_path):
    trainer = Trainer(small_recipe(tmp_path, "optimizer.name=sgd", "optimizer.lr=0.05", "trainer.log_every=2"))

    def explode(epoch, row):  # after a good first epoch: logits of order 1e8, a finite loss of the same order
        with torch.no_grad():
            trainer.model.fc.weight.mul_(1e8)

    trainer.on_epoch_end.append(explode)
    with pytest.raises(Diverged, match=r"diverged in epoch 2.*above 10x its starting value.*3 checks") as info:
        trainer.run()
    assert "Likely fixes: lower optimizer.lr, or set trainer.grad_clip" in str(info.value)
    assert "diverged in epoch 2" in (tmp_path / "run" / "diverged.txt").read_text()  # sweeps/reports see it
    assert load_training_state(tmp_path / "run" / "last.pt")["epoch"] == 1


def test_the_divergence_guard():
    guard = DivergenceGuard(factor=10, patience=2)
    guard.check(2.3, 0, 1)  # the first window sets the reference
    for loss in (30.0, 2.0, 30.0):  # a spike that recovers resets the count
        guard.check(loss, 0, 2)
    with pytest.raises(Diverged, match="2 checks in a row"):
        guard.check(24.0, 0, 3)
    with pytest.raises(NonFiniteLoss, match="non-finite in epoch 4, iteration 7"):
        DivergenceGuard(None, 1).check(float("nan"), 3, 7)  # off: non-finite still stops
    off = DivergenceGuard(None, 1)
    for loss in (2.3, 1e18, 1e18):
        off.check(loss, 0, 1)
    resumed = DivergenceGuard(10, 1, reference=2.3)  # a resumed run keeps the start it had
    with pytest.raises(Diverged):
        resumed.check(24.0, 5, 1)


def test_a_run_blown_up_from_its_first_window_is_caught_against_an_untrained_classifier():
    blown = DivergenceGuard(factor=10, patience=2, num_classes=10)
    blown.check(1e20, 0, 1)  # the first window: its own reference would hide it; ln 10 does not
    assert blown.reference == pytest.approx(2.302585) and blown.strikes == 1
    with pytest.raises(Diverged, match="untrained classifier"):
        blown.check(1e20, 0, 2)
    healthy = DivergenceGuard(factor=10, patience=1, num_classes=10)
    for loss in (2.4, 1.9, 0.5, 3.0):  # a normal start near ln C, and a spike below 10x
        healthy.check(loss, 0, 1)


@pytest.mark.parametrize(
    "options",
    [
        ["trainer.precision=bf16"],
        ["trainer.precision=fp16", "trainer.grad_clip=1.0"],
        ["optimizer.name=adahessian", "optimizer.lr=0.1", "trainer.grad_clip=5.0"],
        ["optimizer.name=apollo", "optimizer.lr=0.5"],
        ["optimizer.estimator=rowsum", "optimizer.engine=finite_difference", "trainer.compile=true"],
        ["trainer.compile=true"],  # the default mode (GNB on a quarter): the model and the update compiled
    ],
    ids=["bf16", "fp16-clip", "adahessian", "apollo", "fd-compile", "compile"],
)
def test_options_run(tmp_path, options):
    rows = Trainer(small_recipe(tmp_path, "trainer.epochs=1", *options)).run()
    assert rows[0]["test_acc1"] > 20.0  # well above chance (10%) after one epoch


def test_a_converted_model_without_bn_trains_with_its_gammas_second_order(tmp_path):
    recipe = recipe_from_dict(
        {
            "model": {"name": "vgg11_nobn", "conversion": {"wn": True}},
            "data": {"name": "synthetic", "num_train": 64, "num_test": 32, "img_size": 32},
            "optimizer": {"name": "sgdph", "lr": 0.01},
            "trainer": {"epochs": 1, "batch_size": 32, "output_dir": str(tmp_path), "name": "wn", "progress": False},
        }
    )
    trainer = Trainer(recipe)
    second = trainer.optimizer.param_groups[0]
    assert second["second_order"] and sum(n.endswith(".gamma") for n in second["param_names"]) == 9
    trainer.run()
    payload = load_training_state(tmp_path / "wn" / "last.pt")
    assert len(payload["conversion"]["layers"]) == 9
    model, _, conversion = load_model(str(tmp_path / "wn" / "last.pt"))  # rebuilt by name and conversion
    assert torch.equal(model.features[0].gamma, payload["state_dict"]["features.0.gamma"])


def test_a_timm_transformer_trains_with_sgdph_out_of_the_box(tmp_path):
    """timm's ViT uses fused attention (no double backward); the optimizer's Hessian pass takes the
    math path, so the autograd engine trains it."""
    recipe = load_recipe(
        ROOT / "recipes" / "quickstart.yaml",
        [
            f"trainer.output_dir={tmp_path}",
            "trainer.epochs=1",
            "data.name=synthetic",
            "data.img_size=16",
            "data.num_train=64",
            "data.num_test=32",
            "data.num_workers=0",
            "model.name=vit_tiny_patch16_224",
            "model.kwargs.img_size=16",
            "model.kwargs.patch_size=4",
            "model.kwargs.depth=2",
            "trainer.batch_size=32",
            "optimizer.estimator=rowsum",  # the double backward, which fused attention lacks
            "optimizer.engine=autograd",
        ],
    )
    rows = Trainer(recipe).run()
    assert len(rows) == 1 and math.isfinite(rows[0]["train_loss"])


@pytest.mark.parametrize(
    "options",
    [["optimizer.gnb_fraction=null"], ["optimizer.estimator=rowsum", "optimizer.engine=gauss_newton"]],
    ids=["gnb-on-logits", "gauss_newton"],
)
def test_the_gauss_newton_estimates_train_in_the_trainer(tmp_path, options):
    rows = Trainer(small_recipe(tmp_path, "trainer.epochs=1", *options)).run()
    assert len(rows) == 1 and rows[0]["test_acc1"] > 30.0  # learned something on digits in one epoch


def test_without_a_validation_set_no_epoch_is_selected(tmp_path):
    rows = Trainer(small_recipe(tmp_path, "data.val_fraction=0", "trainer.epochs=1", name="noval")).run()
    assert "val_acc1" not in rows[0] and "test_acc1" in rows[0]
    assert (tmp_path / "noval" / "last.pt").is_file() and not (tmp_path / "noval" / "best.pt").exists()


def test_the_model_gets_the_datas_channels_whatever_its_own_default(tmp_path):
    # small_cnn's timm config says 1 channel (digits); shapes are RGB.
    recipe = small_recipe(
        tmp_path,
        "data.name=shapes",
        "data.num_train=100",
        "data.num_test=50",
        "data.img_size=16",
        "trainer.batch_size=30",
        "trainer.epochs=1",
        name="rgb",
    )
    trainer = Trainer(recipe)
    assert trainer.model.features[0][0].in_channels == 3 and trainer.spec.kwargs["in_chans"] == 3
    assert trainer.run()[0]["test_acc1"] >= 0.0


def test_the_run_header_says_how_many_cpu_threads_and_the_recipe_can_set_them(tmp_path, capsys):
    before = torch.get_num_threads()
    try:
        trainer = Trainer(small_recipe(tmp_path, "trainer.epochs=1", "trainer.threads=1"))
        assert trainer.threads == 1 and torch.get_num_threads() == 1
        trainer.run()
        assert "(1 CPU thread(s) each)" in capsys.readouterr().out
    finally:
        torch.set_num_threads(before)
