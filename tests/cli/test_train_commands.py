"""sgdph train / report from the command line."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from sgdph_tools.errors import UserError
from tests.cli.helpers import invoke, user_error

ROOT = Path(__file__).resolve().parents[2]
QUICK = str(ROOT / "recipes" / "quickstart.yaml")


def test_dry_run_prints_the_resolved_recipe():
    result = invoke("train", QUICK, "--dry-run", "optimizer.lr=0.05", "trainer.epochs=1")
    assert result.exit_code == 0, result.output
    assert "lr: 0.05" in result.output and "epochs: 1" in result.output and "valid" in result.output
    # only the keys that apply: digits knows its classes, SGD-PH takes no betas, cosine no milestones
    for absent in ("num_classes:", "betas:", "milestones:", "root:"):
        assert absent not in result.output


def test_train_then_report(tmp_path):
    for seed in (0, 1):
        result = invoke("train", QUICK, "trainer.epochs=1", f"trainer.seed={seed}", f"trainer.output_dir={tmp_path}")
        assert result.exit_code == 0, result.output
        assert "epoch 1/1" in result.output
    result = invoke(
        "report",
        str(tmp_path / "quickstart-s0"),
        str(tmp_path / "quickstart-s1"),
        "--json",
        "-",
        "--plot",
        str(tmp_path / "cmp.png"),
    )
    data = json.loads(result.output)
    assert data["format"] == "sgdph-tools/report" and [r["seed"] for r in data["runs"]] == [0, 1]
    record = data["records"][0]
    assert record["runs"] == 2 and record["distinct_seeds"] == 2 and record["world_size"] == 1
    assert isinstance(record["final_acc1_mean"], float) and isinstance(record["final_acc1_std"], float)
    assert (tmp_path / "cmp.png").is_file()
    result = invoke("report", str(tmp_path / "quickstart-s0"))
    assert "quickstart-s0" in result.output and "mean ± std" in result.output


def test_bad_recipe_inputs_are_one_line_errors(tmp_path):
    assert user_error("train", QUICK, "optimizer.lrr=0.1") == (
        "unknown recipe key 'optimizer.lrr'; did you mean 'optimizer.lr', 'optimizer.so_lr', 'optimizer.rule'?"
    )
    assert user_error("train", str(tmp_path / "nope.yaml")) == f"no such recipe file: {tmp_path / 'nope.yaml'}"
    assert "is not a run folder" in user_error("report", str(tmp_path))


def test_nproc_is_checked_before_any_process_starts():
    for bad in ("0", "-3"):
        result = invoke("train", QUICK, "--nproc", bad, "--dry-run")
        assert isinstance(result.exception, UserError) and f"--nproc must be at least 1, got {bad}" in str(
            result.exception
        )
    result = invoke("train", QUICK, "--nproc", "3")  # batch 32 over 3 processes: refused, one line, nothing launched
    assert isinstance(result.exception, UserError) and "launching" not in result.output
    message = str(result.exception)
    assert "does not split evenly over --nproc 3 processes" in message and "\n" not in message


def _image_folder(root: Path) -> Path:
    """An image folder whose class 'b' has a folder but no image in train/."""
    from PIL import Image

    for split, classes in (("train", ("a",)), ("val", ("a", "b"))):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            Image.new("RGB", (8, 8)).save(root / split / c / "x.png")
    (root / "train" / "b").mkdir()
    return root


def test_dry_run_rejects_what_training_would_reject_and_prints_only_valid_recipes(tmp_path):
    cases = [
        (["model.name=resnet18x"], "unknown model 'resnet18x'; did you mean 'resnet18'"),
        (["model.kwargs.widht=3"], "cannot build 'small_cnn'.*unexpected keyword argument 'widht'"),
        (["model.kwargs.width=-3"], "cannot build 'small_cnn'"),
        (["optimizer.so_lr=-1"], "'optimizer.so_lr' must be in"),
        (["optimizer.weight_decay=-1"], "'optimizer.weight_decay' must be in"),
        (["optimizer.momentum=2"], "'optimizer.momentum' must be in"),
        (["optimizer.second_order_kinds=[gamma]"], "unknown kind 'gamma'"),
        (["optimizer.estimator=rowsun"], "did you mean 'rowsum'"),
        (["optimizer.kwargs.nesterov=true"], "optimizer 'sgdph'.*unexpected keyword argument 'nesterov'"),
        (["data.name=cifar10", f"data.root={tmp_path}"], "cifar10 not found under"),
        (["data.name=imagefolder", f"data.root={tmp_path}"], "imagefolder: .* is not a folder"),
        (["optimizer.name=adam", "optimizer.so_lr=0.01"], "does not apply to optimizer.name=adam"),
        # what training refused but --dry-run accepted before
        (["trainer.batch_size=5000"], r"trainer.batch_size=5000 is larger than the training set \(1211 images\)"),
        (["model.kwargs.num_classes=5"], "model.kwargs.num_classes=5 disagrees with the data"),
        (
            ["data.name=imagefolder", f"data.root={_image_folder(tmp_path / 'images')}"],
            "no valid file for the classes b",
        ),
    ]
    if not torch.cuda.is_available():
        cases.append((["trainer.device=cuda"], "no CUDA device is visible"))
    for overrides, message in cases:
        result = invoke("train", QUICK, "--dry-run", *overrides)
        assert isinstance(result.exception, UserError), (overrides, result.output)
        assert re.search(message, str(result.exception)), (message, str(result.exception))
        assert "valid" not in result.output and "epochs:" not in result.output  # no recipe printed
    # a converted model on 1-channel data: the conversion's example input has the model's channels
    result = invoke("train", QUICK, "--dry-run", "model.name=small_cnn_nobn", "model.conversion.wn=true")
    assert result.exit_code == 0 and "valid" in result.output, result.output


def test_block_newton_recipes_train_to_completion(tmp_path):
    """Both ways to get the blocks through the trainer: the cheap estimate (default) and the exact CG."""
    for name, extra in (("cheap", []), ("exact", ["optimizer.engine=gauss_newton", "optimizer.cg_steps=2"])):
        result = invoke(
            "train", QUICK, "trainer.epochs=1", "optimizer.rule=block_newton", "optimizer.so_lr=0.01",
            f"trainer.output_dir={tmp_path}", f"trainer.name={name}", *extra,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        assert "epoch 1/1" in result.output
        state = torch.load(tmp_path / name / "last.pt", weights_only=False)["optimizer"]["state"]
        assert any("hessian_block" in s for s in state.values()) == (name == "cheap")


def test_block_hf_recipe_trains_to_completion_and_resumes(tmp_path):
    """The block-diagonal Hessian-free baseline through the trainer: its shipped digits recipe, its
    damping adapted and kept in the checkpoint, and a resumed run continuing from it."""
    recipe = "digits_small_cnn_block_hf"
    common = [f"trainer.output_dir={tmp_path}", "trainer.name=hf", "trainer.batch_size=128"]
    result = invoke("train", recipe, "trainer.epochs=1", "optimizer.cg_max_iters=3", *common)
    assert result.exit_code == 0, result.output
    assert "with block_hf" in result.output and "epoch 1/1" in result.output
    state = torch.load(tmp_path / "hf" / "last.pt", weights_only=False)["optimizer"]["state"]
    first = state[0]
    assert first["step"] > 0 and first["damping"] != 1.0  # the Levenberg-Marquardt rule moved it
    assert all("cg_solution" in s for s in state.values())
    result = invoke(
        "train", recipe, "trainer.epochs=2", "optimizer.cg_max_iters=3", *common, "--resume", "--allow-changes"
    )
    assert result.exit_code == 0, result.output
    assert "epoch 2/2" in result.output
