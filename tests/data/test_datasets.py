from __future__ import annotations

import pytest
import torch
from PIL import Image

from sgdph_tools.data.datasets import ShardSampler, build_datasets, build_loaders
from sgdph_tools.errors import UserError
from sgdph_tools.recipe import DataCfg


def test_digits_and_synthetic():
    digits = build_datasets(DataCfg(name="digits", img_size=16))
    x, y = digits.train[0]
    assert x.shape == (1, 16, 16) and digits.num_classes == 10 and digits.in_chans == 1
    assert len(digits.train) + len(digits.test) == 1797
    synth = build_datasets(DataCfg(name="synthetic", num_classes=7, channels=2, img_size=12, num_train=20, num_test=6))
    assert synth.train[0][0].shape == (2, 12, 12) and len(synth.test) == 6 and synth.num_classes == 7


def test_imagefolder_from_a_local_folder(tmp_path):
    for split in ("train", "val"):
        for cls, colour in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 30), colour).save(folder / f"{i}.png")
    bundle = build_datasets(DataCfg(name="imagefolder", root=str(tmp_path), img_size=24))
    assert bundle.num_classes == 2 and len(bundle.train) == 6
    x, y = bundle.test[0]
    assert x.shape == (3, 24, 24) and y == 0
    with pytest.raises(UserError, match="is not a folder"):
        build_datasets(DataCfg(name="imagefolder", root=str(tmp_path), val_dir="validation"))


def test_missing_cifar_says_where_and_how(tmp_path):
    with pytest.raises(UserError, match=r"cifar100 not found under .*cifar-100-python.*data.download=true"):
        build_datasets(DataCfg(name="cifar100", root=str(tmp_path)))


def test_loaders_split_the_global_batch_and_shard_evaluation_exactly():
    bundle = build_datasets(DataCfg(name="synthetic", num_train=64, num_test=10))
    seen = []
    for rank in range(3):
        seen += list(ShardSampler(len(bundle.test), rank, 3))
    assert sorted(seen) == list(range(10))  # every test image exactly once, no padding
    train, test, sampler = build_loaders(bundle, DataCfg(), 32, 20, seed=0, rank=1, world=2, pin_memory=False)
    assert next(iter(train))[0].shape[0] == 16 and len(test.sampler) == 5
    with pytest.raises(UserError, match="does not split evenly over 3 processes"):
        build_loaders(bundle, DataCfg(), 32, 20, seed=0, rank=0, world=3, pin_memory=False)
    sampler.set_epoch(1)
    order1 = list(iter(sampler))
    sampler.set_epoch(1)
    assert list(iter(sampler)) == order1  # the epoch's order depends only on seed and epoch
    assert torch.is_tensor(next(iter(test))[0])
