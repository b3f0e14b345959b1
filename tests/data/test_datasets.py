from __future__ import annotations

import pytest
import torch
from PIL import Image

from sgdph_tools.data.datasets import ShardSampler, build_datasets, build_loaders, stratified_split
from sgdph_tools.errors import UserError
from sgdph_tools.recipe import DataCfg


def test_digits_and_synthetic():
    digits = build_datasets(DataCfg(name="digits", img_size=16))
    x, y = digits.train[0]
    assert x.shape == (1, 16, 16) and digits.num_classes == 10 and digits.in_chans == 1
    assert len(digits.train) + len(digits.val) + len(digits.test) == 1797
    synth = build_datasets(DataCfg(name="synthetic", num_classes=7, channels=2, img_size=12, num_train=20, num_test=6))
    assert synth.train[0][0].shape == (2, 12, 12) and len(synth.test) == 6 and synth.num_classes == 7


def test_imagefolder_from_a_local_folder(tmp_path):
    for split in ("train", "val"):
        for cls, colour in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (40, 30), colour).save(folder / f"{i}.png")
    bundle = build_datasets(DataCfg(name="imagefolder", root=str(tmp_path), img_size=24, val_fraction=0.3))
    assert bundle.num_classes == 2 and len(bundle.train) == 4 and len(bundle.val) == 2  # one of each class
    assert sorted(int(bundle.val[i][1]) for i in range(2)) == [0, 1]
    assert bundle.val[0][0].shape == (3, 24, 24)  # the evaluation transform: centre crop, no augmentation
    x, y = bundle.test[0]
    assert x.shape == (3, 24, 24) and y == 0
    with pytest.raises(UserError, match="is not a folder"):
        build_datasets(DataCfg(name="imagefolder", root=str(tmp_path), val_dir="validation"))


def test_missing_cifar_says_where_and_how(tmp_path):
    with pytest.raises(UserError, match=r"cifar100 not found under .*cifar-100-python.*data.download=true"):
        build_datasets(DataCfg(name="cifar100", root=str(tmp_path)))


def test_loaders_split_the_global_batch_and_shard_evaluation_exactly():
    bundle = build_datasets(DataCfg(name="synthetic", num_train=64, num_test=10, val_fraction=0))
    seen = []
    for rank in range(3):
        seen += list(ShardSampler(len(bundle.test), rank, 3))
    assert sorted(seen) == list(range(10))  # every test image exactly once, no padding
    loaders = build_loaders(bundle, DataCfg(), 32, 20, seed=0, rank=1, world=2, pin_memory=False)
    train, test, sampler = loaders.train, loaders.test, loaders.sampler
    assert next(iter(train))[0].shape[0] == 16 and len(test.sampler) == 5 and loaders.val is None
    with pytest.raises(UserError, match="does not split evenly over 3 processes"):
        build_loaders(bundle, DataCfg(), 32, 20, seed=0, rank=0, world=3, pin_memory=False)
    sampler.set_epoch(1)
    order1 = list(iter(sampler))
    sampler.set_epoch(1)
    assert list(iter(sampler)) == order1  # the epoch's order depends only on seed and epoch
    assert torch.is_tensor(next(iter(test))[0])


def test_validation_is_stratified_fixed_and_disjoint_from_training():
    cfg = DataCfg(name="digits")  # default val_fraction 0.1
    a, b = build_datasets(cfg), build_datasets(cfg)
    assert a.val.indices == b.val.indices  # the same images in every run (no dependence on any seed)
    assert not set(a.val.indices) & set(a.train.indices)
    assert len(a.val) + len(a.train) == len(a.val.dataset)
    labels = a.val.dataset.tensors[1]
    counts = torch.bincount(labels[a.val.indices], minlength=10).float()
    totals = torch.bincount(labels, minlength=10).float()
    assert torch.allclose(counts, (0.1 * totals).round())  # per class, not just overall
    train, val = stratified_split([0, 0, 0, 0, 1, 1, 2], 0.25)
    assert sorted(train + val) == list(range(7)) and len(val) == 2  # one of classes 0 and 1; a singleton stays
    assert 6 in train
    with pytest.raises(UserError, match="leaves 1 training and 0 validation"):
        build_datasets(DataCfg(name="synthetic", num_train=1, val_fraction=0.5))


def test_shapes_are_generated_the_same_everywhere_balanced_and_new_in_test():
    from sgdph_tools.data.shapes import generate

    x1, y1 = generate(200, 16, seed=3)
    x2, y2 = generate(200, 16, seed=3)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)  # a fixed seed: the same images on every machine
    assert torch.bincount(y1).tolist() == [20] * 10 and x1.shape == (200, 3, 16, 16)
    bundle = build_datasets(DataCfg(name="shapes", num_train=300, num_test=100, img_size=16))
    assert (bundle.num_classes, bundle.in_chans, len(bundle.train), len(bundle.val), len(bundle.test)) == (
        10,
        3,
        270,
        30,
        100,
    )
    train_x = torch.stack([bundle.val.dataset[i][0] for i in range(300)])
    test_x = torch.stack([bundle.test[i][0] for i in range(100)])
    assert torch.cdist(test_x.flatten(1), train_x.flatten(1)).min() > 1.0  # test images are new draws
