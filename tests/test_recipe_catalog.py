"""The packaged recipes: one copy (the repository's recipes/), names resolved, copies written."""

from __future__ import annotations

from pathlib import Path

import pytest

from sgdph_tools.errors import UserError
from sgdph_tools.recipe import load_recipe
from sgdph_tools.recipe_catalog import catalog, copy_recipe, packaged_recipes, recipes_root, resolve_recipe

REPO = Path(__file__).resolve().parents[1]


def test_the_packaged_recipes_are_the_repositorys_files_and_all_load():
    assert recipes_root().resolve() == (REPO / "recipes").resolve()  # an installed checkout: one copy
    recipes = packaged_recipes()
    on_disk = sorted(REPO.glob("recipes/**/*.yaml"))
    assert sorted(recipes.values()) == sorted(recipes_root() / p.relative_to(REPO / "recipes") for p in on_disk)
    assert len(recipes) == len(on_disk)  # names are unique across the sub-folders
    for path in recipes.values():
        load_recipe(path)


def test_catalog_says_what_each_recipe_trains():
    info = {i.name: i for i in catalog()}
    assert (info["quickstart"].model, info["quickstart"].dataset, info["quickstart"].reproduces) == (
        "small_cnn",
        "digits",
        "-",
    )
    sgdph = info["cifar100_resnet18_sgdph"]
    assert (sgdph.model, sgdph.dataset, sgdph.optimizer, sgdph.reproduces) == (
        "resnet18_cifar",
        "cifar100",
        "sgdph",
        "Table 1",
    )
    assert info["cifar100_vgg19_nobn_sgdph_wn"].reproduces == "Table 4"


def test_a_recipe_argument_is_a_file_or_a_packaged_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_recipe("quickstart") == packaged_recipes()["quickstart"]
    assert resolve_recipe("quickstart.yaml") == packaged_recipes()["quickstart"]
    mine = tmp_path / "quickstart.yaml"
    mine.write_text("model: {name: small_cnn}\n")
    assert resolve_recipe("quickstart.yaml") == Path("quickstart.yaml")  # a file in the way wins
    with pytest.raises(UserError, match="did you mean the packaged recipe 'quickstart'"):
        resolve_recipe("quikstart")
    with pytest.raises(UserError, match="runs with `sgdph train cifar10_resnet18_sgd`"):
        resolve_recipe("recipes/cifar/cifar10_resnet18_sgd.yaml")  # a checkout's path, outside a checkout
    with pytest.raises(UserError, match="no such recipe file: elsewhere/x.yaml$"):
        resolve_recipe("elsewhere/x.yaml")


def test_copy_writes_the_packaged_file_and_never_overwrites_silently(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    written = copy_recipe("quickstart")
    assert written == Path("quickstart.yaml") and written.read_text() == packaged_recipes()["quickstart"].read_text()
    with pytest.raises(UserError, match="--force"):
        copy_recipe("quickstart")
    (tmp_path / "mine").mkdir()
    assert copy_recipe("cifar10_resnet18_sgdph", tmp_path / "mine") == tmp_path / "mine" / "cifar10_resnet18_sgdph.yaml"
    assert copy_recipe("quickstart", "quickstart.yaml", force=True).exists()
    with pytest.raises(UserError, match="did you mean 'quickstart'"):
        copy_recipe("quickstar")
