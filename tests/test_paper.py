"""The paper recipes in recipes/ are exactly what sgdph_tools.paper generates from the paper's tables."""

from __future__ import annotations

from pathlib import Path

from sgdph_tools.paper import paper_recipes
from sgdph_tools.recipe import load_recipe

ROOT = Path(__file__).resolve().parents[1]


def test_recipe_files_match_the_paper_tables():
    generated = dict(paper_recipes())
    on_disk = {p.relative_to(ROOT).as_posix() for p in (ROOT / "recipes").rglob("*.yaml")}
    study = ("recipes/shapes/", "recipes/digits/")  # the study's recipes (docs/evidence.md), not the paper's
    on_disk = {p for p in on_disk if p != "recipes/quickstart.yaml" and not p.startswith(study)}
    assert on_disk == set(generated), "run: python -m sgdph_tools.paper"
    for relative, text in generated.items():
        assert (ROOT / relative).read_text() == text, f"{relative} is stale: run python -m sgdph_tools.paper"
    assert len(generated) == 56 + 3 + 14 + 3  # Table 1, Table 4, Table 2, Table 3


def test_key_settings_of_the_paper():
    sgdph = load_recipe(ROOT / "recipes/cifar/cifar100_resnet18_sgdph.yaml")
    assert (sgdph.optimizer.lr, sgdph.optimizer.weight_decay, sgdph.optimizer.so_lr) == (0.01, 5e-3, 1e-3)
    assert (sgdph.trainer.epochs, sgdph.trainer.batch_size, sgdph.schedule.milestones) == (200, 128, [60, 120, 180])
    wn = load_recipe(ROOT / "recipes/vgg19-nobn/cifar100_vgg19_nobn_sgdph_wn.yaml")
    assert wn.model.name == "vgg19_nobn" and wn.model.conversion.wn and wn.optimizer.weight_decay == 1e-3
    imagenet = load_recipe(ROOT / "recipes/imagenet/imagenet_resnet18_sgdph.yaml")
    assert (imagenet.optimizer.lr, imagenet.trainer.batch_size, imagenet.schedule.milestones) == (
        0.1,
        256,
        [30, 60, 90],
    )
