"""Recipe schema: validation messages, overrides, and every shipped recipe file."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import yaml

from sgdph_tools.errors import UserError
from sgdph_tools.recipe import Recipe, load_recipe, parse_override, recipe_from_dict

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").rglob("*.yaml"))


def test_defaults_and_overrides():
    recipe = recipe_from_dict(
        {"optimizer": {"name": "sgd", "lr": 1}},
        [
            "optimizer.lr=0.05",
            "trainer.epochs=3",
            "model.conversion.wn=true",
            "schedule.milestones=[1, 2]",
            "model.kwargs.drop_rate=0.1",
        ],
    )
    assert isinstance(recipe, Recipe)
    assert recipe.optimizer.lr == 0.05 and isinstance(recipe.optimizer.lr, float)
    assert recipe.trainer.epochs == 3 and recipe.model.conversion.wn is True
    assert recipe.schedule.milestones == [1, 2] and recipe.model.kwargs == {"drop_rate": 0.1}
    assert recipe.trainer.batch_size == 128 and recipe.data.name == "digits"  # defaults
    assert parse_override("trainer.name=my run") == ("trainer.name", "my run")


@pytest.mark.parametrize(
    "data,overrides,message",
    [
        ({"optimizer": {"lrr": 0.1}}, [], "unknown recipe key 'optimizer.lrr'; did you mean 'optimizer.lr'"),
        ({"trainr": {}}, [], "unknown recipe key 'trainr'; did you mean 'trainer'"),
        ({}, ["trainer.epochs=ten"], "recipe key 'trainer.epochs' must be an integer, got 'ten'"),
        ({}, ["trainer.epochs=2.5"], "'trainer.epochs' must be an integer"),
        ({}, ["model.conversion.wn=1"], "'model.conversion.wn' must be true/false"),
        ({}, ["optimizer.name=sgdm"], "must be one of 'sgdph', 'sgd'.*did you mean 'sgd'"),
        ({}, ["schedule.milestones=60"], "must be a list of an integer"),
        ({}, ["trainer.grad_clip=abc"], "'trainer.grad_clip' must be a number or null"),
        ({"model": "resnet18"}, [], "section 'model' must be a mapping"),
        ({}, ["optimizer.lr"], "must look like section.key=value"),
        ({}, ["trainer.epochs=0"], "'trainer.epochs' must be at least 1"),
        ({}, ["data.name=cifar10"], "needs data.root"),
        ({}, ["optimizer.estimator=rowsum", "trainer.compile=true"], "engine=finite_difference"),
        ({}, ["trainer.compile_mode=reduce-overhead"], "set trainer.compile=true"),
        ({}, ["trainer.compile_mode=fast"], "must be one of 'default', 'reduce-overhead'"),
        ({}, ["optimizer.estimator=rowsum", "optimizer.gnb_fraction=0.5"], "applies to optimizer.estimator=gnb only"),
        ({}, ["optimizer.gnb_fraction=0"], r"'optimizer.gnb_fraction' must be in \(0, 1\] or null"),
        # ranges: what training would reject, or would run with a meaningless value
        ({}, ["optimizer.so_lr=-1"], r"'optimizer.so_lr' must be in \[0, ∞\), got -1"),
        ({}, ["optimizer.weight_decay=-1"], "'optimizer.weight_decay' must be in"),
        ({}, ["optimizer.momentum=2"], r"'optimizer.momentum' must be in \[0, 1\), got 2"),
        ({}, ["optimizer.hessian_momentum=1"], "'optimizer.hessian_momentum' must be in"),
        ({}, ["optimizer.eps=0"], r"'optimizer.eps' must be in \(0, ∞\)"),
        ({}, ["optimizer.name=adam", "optimizer.betas=[0.9]"], "takes two numbers"),
        ({}, ["optimizer.name=adam", "optimizer.betas=[0.9,1.5]"], r"'optimizer.betas\[1\]' must be in"),
        ({}, ["optimizer.second_order_kinds=[norm_wieght]"], "unknown kind 'norm_wieght'; did you mean 'norm_weight'"),
        ({}, ["schedule.gamma=0"], "'schedule.gamma' must be in"),
        ({}, ["schedule.warmup_factor=0"], "'schedule.warmup_factor' must be in"),
        ({}, ["schedule.milestones=[-1,2]"], "epochs >= 0"),
        ({}, ["trainer.grad_clip=-1"], "'trainer.grad_clip' must be in"),
        ({}, ["data.num_workers=-1"], "'data.num_workers' must be at least 0"),
        ({}, ["data.name=shapes", "data.num_train=0"], "'data.num_train' must be at least 1"),
        # keys that do not apply to the chosen name: rejected, naming what the choice takes
        (
            {},
            ["optimizer.name=adam", "optimizer.so_lr=1e-3"],
            "'optimizer.so_lr' does not apply to optimizer.name=adam.*"
            "takes: lr, weight_decay, weight_decay_1d, betas, eps, kwargs",
        ),
        (
            {},
            ["optimizer.name=sgd", "optimizer.betas=[0.9,0.99]"],
            "'optimizer.betas' does not apply to optimizer.name=sgd.*"
            "takes: lr, weight_decay, weight_decay_1d, momentum, kwargs",
        ),
        ({}, ["optimizer.name=adamw", "optimizer.momentum=0.9"], "'optimizer.momentum' does not apply"),
        (
            {},
            ["schedule.name=cosine", "schedule.milestones=[3]"],
            "'schedule.milestones' does not apply to schedule.name=cosine",
        ),
        ({}, ["data.name=digits", "data.root=/data"], "'data.root' does not apply to data.name=digits"),
        ({}, ["data.name=shapes", "data.num_classes=5"], "'data.num_classes' does not apply"),
    ],
)
def test_bad_recipes_name_the_key_and_the_fix(data, overrides, message):
    with pytest.raises(UserError, match=message):
        recipe_from_dict(data, overrides)


def test_load_recipe_file_errors(tmp_path):
    with pytest.raises(UserError, match="no such recipe file"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(UserError, match="not valid YAML at line"):
        load_recipe(bad)
    good = tmp_path / "good.yaml"
    good.write_text("model: {name: small_cnn}\ndata: {name: digits}\ntrainer: {seed: 3}\n")
    assert load_recipe(good).trainer.name == "good-s3"  # default run name: file name and seed


@pytest.mark.parametrize(
    "text,overrides,missing",
    [
        ("", [], "set model.name and data.name"),  # an empty file would start a 200-epoch default run
        ("trainer: {epochs: 3}\n", [], "set model.name and data.name"),
        ("model: {name: small_cnn}\n", [], "set data.name"),
        ("data: {name: digits}\nmodel: {kwargs: {drop_rate: 0.1}}\n", [], "set model.name"),
    ],
)
def test_a_recipe_must_say_what_model_and_data_it_trains(tmp_path, text, overrides, missing):
    path = tmp_path / "r.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=f"does not say what to train: {missing}.*packaged recipe"):
        load_recipe(path, overrides)
    load_recipe(path, ["model.name=small_cnn", "data.name=digits"])  # overrides may say it


def test_a_resolved_recipe_round_trips():
    recipe = recipe_from_dict({"optimizer": {"name": "adamw", "betas": [0.9, 0.99]}})
    assert recipe_from_dict(yaml.safe_load(recipe.to_yaml())) == recipe


@pytest.mark.parametrize("path", RECIPES, ids=[p.name for p in RECIPES])
def test_every_shipped_recipe_is_valid_and_says_how_to_run_it(path):
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith(f"# sgdph train {path.relative_to(ROOT).as_posix()}"), first_line
    load_recipe(path)  # the dry run: full validation, nothing built


def test_docs_document_every_key():
    import dataclasses

    from sgdph_tools.recipe import ConversionCfg, DataCfg, ModelCfg, OptimizerCfg, ScheduleCfg, TrainerCfg

    doc = (ROOT / "docs" / "training.md").read_text()
    for section, cls in (
        ("model", ModelCfg),
        ("data", DataCfg),
        ("optimizer", OptimizerCfg),
        ("schedule", ScheduleCfg),
        ("trainer", TrainerCfg),
    ):
        assert f"## `{section}`" in doc
        for f in dataclasses.fields(cls):
            if f.name != "conversion":
                assert f"`{f.name}`" in doc, f"{section}.{f.name} is not documented in docs/training.md"
    for f in dataclasses.fields(ConversionCfg):
        assert f"`conversion.{f.name}`" in doc


def test_an_optimizer_from_a_missing_extra_is_named_with_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "pytorch_optimizer", None)  # what an install without the extra sees
    with pytest.raises(UserError, match=r"pip install 'sgdph-tools\[baselines\]'"):
        recipe_from_dict({"optimizer": {"name": "apollo"}})
    recipe_from_dict({"optimizer": {"name": "adabelief"}})  # timm's own: no extra


@pytest.mark.parametrize(
    "text, value", [("1e-8", 1e-8), ("5E-4", 5e-4), ("1e6", 1e6), ("2.5e+3", 2500.0), (".5e2", 50.0), ("0.1", 0.1)]
)
def test_numbers_in_exponent_form_are_numbers_in_files_and_overrides(tmp_path, text, value):
    assert recipe_from_dict({}, [f"optimizer.eps={text}"]).optimizer.eps == value
    path = tmp_path / "r.yaml"
    path.write_text(f"model: {{name: small_cnn}}\ndata: {{name: digits}}\noptimizer:\n  lr: {text}\n")
    assert load_recipe(path).optimizer.lr == value


def test_non_finite_numbers_are_rejected():
    for text in (".inf", "-.inf", ".nan"):
        with pytest.raises(UserError, match="must be a finite number"):
            recipe_from_dict({}, [f"optimizer.weight_decay={text}"])


def test_a_recorded_recipe_that_predates_a_key_gets_its_default_and_keeps_what_it_recorded():
    from sgdph_tools.recipe import Recipe, with_defaults

    recorded = Recipe().as_dict()
    del recorded["optimizer"]["rule"]  # written before the key existed
    recorded["optimizer"]["lr"] = 0.3
    recorded["model"]["kwargs"] = {"width": 16}
    merged = with_defaults(recorded)
    assert merged["optimizer"]["rule"] == "paper" and merged["optimizer"]["lr"] == 0.3
    assert merged["model"]["kwargs"] == {"width": 16}  # a recorded dict of free keys is kept whole
    assert with_defaults(Recipe().as_dict()) == Recipe().as_dict()
    # the rule's default changed (paper -> normalized): a recorded SGD-PH run without it ran the paper's;
    # for another optimizer the key does not apply and takes today's default, as a new recipe has it
    assert Recipe().optimizer.rule == "normalized"
    recorded["optimizer"]["name"] = "sgd"
    assert with_defaults(recorded)["optimizer"]["rule"] == "normalized"


def test_sgdph_estimates_gnb_from_a_quarter_of_the_batch_by_default_and_other_estimators_have_no_fraction():
    # the study's choice (docs/evidence.md "Defaults"); the paper's estimator is one key away
    o = recipe_from_dict({}).optimizer
    assert (o.estimator, o.gnb_fraction, o.rule) == ("gnb", 0.25, "normalized")
    assert recipe_from_dict({}, ["optimizer.gnb_fraction=null"]).optimizer.gnb_fraction is None  # the step's logits
    o = recipe_from_dict({}, ["optimizer.estimator=rowsum"]).optimizer
    assert (o.estimator, o.gnb_fraction) == ("rowsum", None)  # as recorded before the change
    # a run recorded before the estimator and gnb_fraction keys existed ran rowsum (on the step's logits)
    from sgdph_tools.recipe import with_defaults

    recorded = recipe_from_dict({}).as_dict()
    del recorded["optimizer"]["estimator"], recorded["optimizer"]["gnb_fraction"]
    merged = with_defaults(recorded)["optimizer"]
    assert (merged["estimator"], merged["gnb_fraction"]) == ("rowsum", None)


def test_keys_a_run_did_not_use_do_not_tell_runs_apart():
    from sgdph_tools.recipe import applicable_settings

    new_sgdm = recipe_from_dict({"optimizer": {"name": "sgd"}}).as_dict()
    old_sgdm = copy.deepcopy(new_sgdm)  # an SGDM run recorded under SGD-PH's earlier defaults
    old_sgdm["optimizer"].update(estimator="rowsum", gnb_fraction=None, rule="paper")
    assert recipe_from_dict(old_sgdm).optimizer.name == "sgd"  # still loads
    assert applicable_settings(old_sgdm) == applicable_settings(new_sgdm)
    assert "estimator" not in applicable_settings(new_sgdm)["optimizer"]
    rowsum = applicable_settings(recipe_from_dict({}, ["optimizer.estimator=rowsum"]).as_dict())["optimizer"]
    assert "gnb_fraction" not in rowsum and rowsum["estimator"] == "rowsum"


def test_a_recorded_recipe_keeps_loading_though_it_lists_keys_that_do_not_apply():
    recorded = yaml.safe_load(recipe_from_dict({"optimizer": {"name": "adamw"}}).to_yaml())
    assert "so_lr" in recorded["optimizer"]  # a run's recipe.yaml lists every key, at its default
    assert recipe_from_dict(recorded).optimizer.name == "adamw"
    recorded["optimizer"]["so_lr"] = 0.5  # but a changed value that would be ignored is still an error
    with pytest.raises(UserError, match="'optimizer.so_lr' does not apply"):
        recipe_from_dict(recorded)


def test_an_override_that_changes_the_choice_drops_the_files_settings_for_the_old_one():
    quickstart = ROOT / "recipes" / "quickstart.yaml"  # SGD-PH, with hessian_momentum, estimator, ... and cosine
    sgd = load_recipe(quickstart, ["optimizer.name=sgd", "optimizer.lr=0.1"])
    assert (sgd.optimizer.name, sgd.optimizer.lr, sgd.optimizer.momentum) == ("sgd", 0.1, 0.9)
    with pytest.raises(UserError, match="'optimizer.so_lr' does not apply to optimizer.name=sgd"):
        load_recipe(quickstart, ["optimizer.name=sgd", "optimizer.so_lr=0.01"])  # said in this command
    multistep = load_recipe(quickstart, ["schedule.name=multistep", "schedule.milestones=[10, 20]"])
    assert multistep.schedule.milestones == [10, 20]


def test_an_override_that_changes_the_model_drops_the_files_constructor_arguments():
    shapes = ROOT / "recipes" / "shapes" / "shapes_small_cnn_sgdph.yaml"  # small_cnn with width, stages, ...
    vit = load_recipe(shapes, ["model.name=vit_tiny_patch16_224", "model.kwargs.img_size=32"])
    assert vit.model.kwargs == {"img_size": 32}
    same = load_recipe(shapes, ["model.name=small_cnn"])  # the same architecture keeps them
    assert same.model.kwargs == {"width": 16, "stages": 4, "stem_stride": 2}


def test_a_key_given_twice_and_a_file_that_is_not_utf8_are_refused(tmp_path):
    twice = tmp_path / "twice.yaml"
    twice.write_text("model: {name: small_cnn}\ndata: {name: digits}\noptimizer:\n  lr: 0.1\n  lr: 0.2\n")
    with pytest.raises(UserError, match=r"not valid YAML at line 5: the key 'lr' is given twice \(first at line 4\)"):
        load_recipe(twice)
    latin = tmp_path / "latin.yaml"
    latin.write_bytes("model: {name: small_cnn}\ndata: {name: digits}\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"is not UTF-8 text \(byte 0xe9 at position \d+\): save the recipe as UTF-8"):
        load_recipe(latin)


def test_recipes_refresh_every_10_steps_and_the_authors_rule_reads_that_as_every_step():
    assert recipe_from_dict({}).optimizer.hessian_every == 10  # the refresh-interval study's choice
    authors = recipe_from_dict({}, ["optimizer.authors_code=true"]).optimizer
    assert (authors.estimator, authors.hessian_every) == ("rowsum", 1)
    with pytest.raises(UserError, match="authors_code=true is the authors' rule"):
        recipe_from_dict({}, ["optimizer.authors_code=true", "optimizer.hessian_every=5"])
    # an SGDM run recorded before the change lists hessian_every at its default then, 1: it still loads
    recorded = Recipe().as_dict()
    recorded["optimizer"].update(name="sgd", hessian_every=1)
    assert recipe_from_dict(recorded).optimizer.name == "sgd"


def test_block_newton_recipes_need_gauss_newton_curvature_and_the_exact_mode_solves_every_step():
    cheap = recipe_from_dict({}, ["optimizer.rule=block_newton"]).optimizer
    assert (cheap.estimator, cheap.gnb_fraction, cheap.hessian_every) == ("gnb", 0.25, 10)
    exact = recipe_from_dict({}, ["optimizer.rule=block_newton", "optimizer.engine=gauss_newton"]).optimizer
    assert exact.hessian_every == 1
    with pytest.raises(UserError, match="needs Gauss-Newton curvature.*optimizer.estimator=gnb"):
        recipe_from_dict({}, ["optimizer.rule=block_newton", "optimizer.estimator=rowsum"])
    with pytest.raises(UserError, match="cg_steps"):
        recipe_from_dict({}, ["optimizer.cg_steps=0"])
    assert recipe_from_dict({}, ["optimizer.rule=block_normalized"]).optimizer.estimator == "gnb"
    with pytest.raises(UserError, match="block_normalized takes its damping relative"):
        recipe_from_dict({}, ["optimizer.rule=block_normalized", "optimizer.engine=gauss_newton"])


def test_block_hf_recipes_take_their_own_keys_and_reject_what_they_cannot_run():
    o = recipe_from_dict({}, ["optimizer.name=block_hf", "optimizer.lr=1.0"]).optimizer
    assert (o.damping, o.adapt_damping, o.cg_max_iters, o.cg_tol, o.backtracking, o.curvature_fraction) == (
        1.0, True, 20, 1e-3, False, None,
    )  # fmt: skip
    with pytest.raises(UserError, match="'optimizer.so_lr' does not apply to optimizer.name=block_hf.*takes:.*damping"):
        recipe_from_dict({"optimizer": {"name": "block_hf", "so_lr": 0.1}})
    with pytest.raises(UserError, match="'optimizer.damping' does not apply to optimizer.name=sgd"):
        recipe_from_dict({"optimizer": {"name": "sgd", "damping": 0.1}})
    with pytest.raises(UserError, match="weight_decay_1d does not apply to optimizer.name=block_hf"):
        recipe_from_dict({}, ["optimizer.name=block_hf", "optimizer.weight_decay_1d=0"])
    with pytest.raises(UserError, match="block_hf cannot run with trainer.precision=fp16"):
        recipe_from_dict({}, ["optimizer.name=block_hf", "trainer.precision=fp16"])
    with pytest.raises(UserError, match="'optimizer.curvature_fraction' must be in"):
        recipe_from_dict({}, ["optimizer.name=block_hf", "optimizer.curvature_fraction=0"])
