"""``trainer.strategy: fsdp``: FSDP2 through ``sgdph train --nproc 2`` (torchrun, gloo on the CPU), its
sharded checkpoints (resumed on one process, exported), what it refuses, and which modules it shards."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import timm
import torch
import torch.multiprocessing as mp

from sgdph_tools.models.factory import ModelSpec, create_model
from sgdph_tools.surgery.checkpoint import load_model
from sgdph_tools.train.metrics import read_metrics
from sgdph_tools.train.sharding import shard_units
from sgdph_tools.train.state import load_training_state
from sgdph_tools.train.trainer import Trainer
from tests.cli.helpers import sgdph, user_error
from tests.conftest import distinct_ports
from tests.train.test_trainer import small_recipe


@pytest.mark.slow
def test_quickstart_shards_over_two_processes_resumes_on_one_and_exports(tmp_path):
    runs = tmp_path / "runs"
    result = sgdph(
        "train",
        "recipes/quickstart.yaml",
        "--nproc",
        "2",
        "trainer.strategy=fsdp",
        "trainer.compile=true",  # the sharded model compiled between FSDP's hooks (docs/training.md)
        "trainer.epochs=2",
        "trainer.progress=false",
        f"trainer.output_dir={runs}",
        env={"OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 process(es) (FSDP2, sharded)" in result.stdout
    run = runs / "quickstart-s0"
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["strategy"] for r in rows] == ["fsdp", "fsdp"] and rows[-1]["test_acc1"] > 80.0
    state = load_training_state(run / "last.pt")
    assert state["state_dict"] is None and state["optimizer"] is None  # the shards are in the DCP folder
    assert (run / state["sharded_state"]).is_dir()
    folders = {p.name for p in run.glob("*.dcp")}
    assert folders == {state["sharded_state"], load_training_state(run / "best.pt")["sharded_state"]}

    # on one process, without FSDP: the world size changed (and the strategy), so --allow-changes
    again = ["train", "recipes/quickstart.yaml", "trainer.epochs=3", "trainer.progress=false", "trainer.compile=true"]
    again.append(f"trainer.output_dir={runs}")
    refused = sgdph(*again, "--resume")
    assert refused.returncode == 2 and "trained on 2 process(es) and is resumed on 1" in refused.stderr
    resumed = sgdph(*again, "--resume", "--allow-changes", env={"OMP_NUM_THREADS": "1"})
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    rows = read_metrics(run / "metrics.jsonl")
    assert rows[-1]["epoch"] == 3 and rows[-1]["strategy"] == "ddp" and rows[-1]["test_acc1"] > 80.0
    events = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"event"' in line]
    changes = events[-1]["changes"]
    assert changes["world_size"] == [2, 1] and changes["trainer.strategy"] == ["fsdp", "ddp"]
    assert load_training_state(run / "last.pt")["sharded_state"] is None  # written whole again

    # inspect reads the weights of a sharded best.pt (gathered from its DCP folder)
    shown = sgdph("inspect", str(run / "best.pt"))
    assert shown.returncode == 0 and "second_order" in shown.stdout, shown.stderr


class Interrupt(Exception):
    pass


def resume_worker(rank: int, ports: list[int], out: str) -> None:
    """Under torchrun's environment: two epochs straight, then one epoch interrupted and resumed. Each
    trainer makes (and destroys) its own process group, each on its own port: a group made again on the
    port of one just destroyed can meet the old store's keys and hang."""
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1")
    os.environ.update(MASTER_PORT=str(ports[0]), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    options = ["trainer.strategy=fsdp", "trainer.epochs=2"]
    Trainer(small_recipe(Path(out), *options, name="straight")).run()

    def stop_after_first_epoch(epoch, row):
        if epoch == 0:
            raise Interrupt

    os.environ["MASTER_PORT"] = str(ports[1])
    cut = Trainer(small_recipe(Path(out), *options, name="cut"))
    cut.on_epoch_end.append(stop_after_first_epoch)
    try:
        cut.run()
    except Interrupt:
        pass
    os.environ["MASTER_PORT"] = str(ports[2])
    Trainer(small_recipe(Path(out), *options, name="cut"), resume=True).run()


@pytest.mark.slow
def test_a_sharded_run_resumed_on_the_same_processes_continues_bit_for_bit(tmp_path):
    """Two epochs straight against one epoch, interrupted, then --resume for the second, on two processes
    under FSDP (dropout on: the RNG comes back too): the same weights, read back from the DCP folders,
    and the same metrics."""
    mp.spawn(resume_worker, args=(distinct_ports(3), str(tmp_path)), nprocs=2, join=True)
    weights = [load_model(str(tmp_path / name / "last.pt"))[0].state_dict() for name in ("straight", "cut")]
    assert load_training_state(tmp_path / "cut" / "last.pt")["sharded_state"] is not None
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    rows = [read_metrics(tmp_path / name / "metrics.jsonl") for name in ("straight", "cut")]
    assert [r["epoch"] for r in rows[1]] == [1, 2]
    for key in ("train_loss", "train_acc1", "val_acc1", "test_loss", "test_acc1"):
        assert [r[key] for r in rows[0]] == [r[key] for r in rows[1]], key


def test_what_fsdp_cannot_run_is_refused_with_the_fix():
    base = ["train", "recipes/quickstart.yaml", "--dry-run", "trainer.strategy=fsdp"]
    assert "estimator='gnb' with gnb_fraction" in user_error(*base, "optimizer.estimator=rowsum")
    assert "set gnb_fraction" in user_error(*base, "optimizer.gnb_fraction=null")
    assert "trainer.strategy=ddp" in user_error(*base, "optimizer.name=block_hf", "optimizer.lr=1")
    assert "trainer.precision=bf16" in user_error(*base, "trainer.precision=fp16")


@pytest.mark.parametrize(
    "name, expected",
    [
        # timm ResNet: the blocks of layer1..4 (two BasicBlocks each)
        ("resnet18", {f"layer{i}.{j}" for i in range(1, 5) for j in range(2)}),
        # this project's small net: its stages
        ("small_cnn", {f"features.{i}" for i in range(3)}),
    ],
)
def test_the_blocks_are_sharded_one_by_one(name, expected):
    with torch.device("meta"):
        model = create_model(ModelSpec.parse(name, num_classes=10))
    names = {m: n for n, m in model.named_modules()}
    assert {names[m] for m in shard_units(model)} == expected


def test_nested_units_come_innermost_first():
    """ConvNeXt: each stage and each stage's blocks; a block is sharded before the stage holding it."""
    with torch.device("meta"):
        model = timm.create_model("convnext_atto", num_classes=10)
    names = {m: n for n, m in model.named_modules()}
    order = [names[m] for m in shard_units(model)]
    assert "stages.0" in order and "stages.0.blocks.0" in order
    assert order.index("stages.0.blocks.0") < order.index("stages.0")
