"""Datasets by name, with the paper's augmentations, and the loaders that feed the trainer.

- ``digits``: scikit-learn's digits (inside scikit-learn: no download), fixed stratified split.
- ``cifar10``/``cifar100``: torchvision's datasets from a local root (downloaded only when asked);
  random crop with padding 4, horizontal flip, normalisation (the paper's CIFAR augmentation).
- ``imagefolder``: ``root/train`` and ``root/val`` class folders (mini-ImageNet, ImageNet);
  random-resized crop and flip for training, resize and centre crop for evaluation.
- ``synthetic``: random images and labels of a given shape (smoke tests and benchmarks only).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, TensorDataset

from ..errors import UserError
from ..recipe import DataCfg
from .digits import NUM_CLASSES as DIGITS_CLASSES
from .digits import digits_tensors

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass
class DataBundle:
    train: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    img_size: int


def build_datasets(cfg: DataCfg) -> DataBundle:
    """The train and test datasets for ``cfg`` (errors name what is missing and how to fix it)."""
    if cfg.name == "digits":
        size = cfg.img_size or 8
        x_train, y_train, x_test, y_test = digits_tensors(img_size=size)
        return DataBundle(TensorDataset(x_train, y_train), TensorDataset(x_test, y_test), DIGITS_CLASSES, 1, size)
    if cfg.name == "synthetic":
        size = cfg.img_size or 32
        gen = torch.Generator().manual_seed(1234)
        shape = (cfg.channels, size, size)

        def make(n: int) -> TensorDataset:
            return TensorDataset(torch.randn(n, *shape, generator=gen),
                                 torch.randint(0, cfg.num_classes, (n,), generator=gen))

        return DataBundle(make(cfg.num_train), make(cfg.num_test), cfg.num_classes, cfg.channels, size)
    if cfg.name in ("cifar10", "cifar100"):
        return _cifar(cfg)
    if cfg.name == "imagefolder":
        return _imagefolder(cfg)
    raise UserError(f"unknown dataset '{cfg.name}'")  # the recipe schema already checks the name


def _cifar(cfg: DataCfg) -> DataBundle:
    from torchvision import datasets, transforms as T

    cls = datasets.CIFAR10 if cfg.name == "cifar10" else datasets.CIFAR100
    size = cfg.img_size or 32
    normalize = [T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)]
    resize = [T.Resize(size)] if size != 32 else []
    train_tf = T.Compose(resize + ([T.RandomCrop(size, padding=4), T.RandomHorizontalFlip()] if cfg.augment else []) + normalize)
    test_tf = T.Compose(resize + normalize)
    root = Path(cfg.root).expanduser()
    try:
        train = cls(str(root), train=True, transform=train_tf, download=cfg.download)
        test = cls(str(root), train=False, transform=test_tf, download=cfg.download)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted..."
        folder = "cifar-10-batches-py" if cfg.name == "cifar10" else "cifar-100-python"
        raise UserError(
            f"{cfg.name} not found under {root} (expected {root / folder}): put the extracted python version "
            "there, or set data.download=true on a machine with internet"
        ) from exc
    except OSError as exc:  # download failed (no network)
        raise UserError(f"could not download {cfg.name} into {root}: {exc}; place the files there by hand") from exc
    return DataBundle(train, test, 10 if cfg.name == "cifar10" else 100, 3, size)


def _imagefolder(cfg: DataCfg) -> DataBundle:
    from torchvision import datasets, transforms as T

    size = cfg.img_size or 224
    root = Path(cfg.root).expanduser()
    normalize = [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    if cfg.augment:
        train_tf = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip()] + normalize)
    else:
        train_tf = T.Compose([T.Resize(int(size / 0.875)), T.CenterCrop(size)] + normalize)
    test_tf = T.Compose([T.Resize(int(size / 0.875)), T.CenterCrop(size)] + normalize)
    folders = {}
    for split, sub in (("train", cfg.train_dir), ("val", cfg.val_dir)):
        folders[split] = root / sub
        if not folders[split].is_dir():
            raise UserError(f"imagefolder: {folders[split]} is not a folder; expected {root}/{{{cfg.train_dir},"
                            f"{cfg.val_dir}}}/<class>/<image> (set data.root, data.train_dir, data.val_dir)")
    try:
        train = datasets.ImageFolder(str(folders["train"]), transform=train_tf)
        test = datasets.ImageFolder(str(folders["val"]), transform=test_tf)
    except (FileNotFoundError, RuntimeError) as exc:
        raise UserError(f"imagefolder under {root}: {exc}") from exc
    if train.classes != test.classes:
        raise UserError(f"imagefolder: {folders['train']} and {folders['val']} have different class folders")
    return DataBundle(train, test, len(train.classes), 3, size)


class ShardSampler(Sampler[int]):
    """Every index once across all processes (rank r takes r, r + world, ...), with no padding:
    evaluation sums reduced across processes are then exact."""

    def __init__(self, length: int, rank: int, world: int):
        self.indices = list(range(rank, length, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


def build_loaders(bundle: DataBundle, cfg: DataCfg, batch_size: int, eval_batch_size: int, *, seed: int,
                  rank: int, world: int, pin_memory: bool) -> tuple[DataLoader, DataLoader, DistributedSampler]:
    """Train/test loaders. ``batch_size`` is global; each process loads ``batch_size // world``.

    The training sampler is a DistributedSampler in every case (one process is a world of 1), so the
    order of an epoch depends only on the seed and the epoch: resumed runs see the same batches.
    """
    if batch_size % world:
        raise UserError(f"trainer.batch_size={batch_size} does not split evenly over {world} processes")
    sampler = DistributedSampler(bundle.train, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    tensor_data = isinstance(bundle.train, TensorDataset)  # already in memory: workers would only add overhead
    workers = 0 if tensor_data else cfg.num_workers
    common = dict(num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0)
    if workers > 0:
        common["prefetch_factor"] = 4
    train = DataLoader(bundle.train, batch_size=batch_size // world, sampler=sampler, drop_last=True, **common)
    test = DataLoader(bundle.test, batch_size=max(1, eval_batch_size // world),
                      sampler=ShardSampler(len(bundle.test), rank, world), **common)
    if len(train) == 0:
        raise UserError(f"trainer.batch_size={batch_size} is larger than the training set ({len(bundle.train)} images)")
    return train, test, sampler
