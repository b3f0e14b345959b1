"""Datasets by name, with the paper's augmentations, and the loaders that feed the trainer.

- ``digits``: scikit-learn's digits (inside scikit-learn: no download), fixed stratified split.
- ``shapes``: generated 10-class shape images (:mod:`sgdph_tools.data.shapes`): harder than digits,
  no download, the same on every machine.
- ``cifar10``/``cifar100``: torchvision's datasets from a local root (downloaded only when asked);
  random crop with padding 4, horizontal flip, normalisation (the paper's CIFAR augmentation).
- ``imagefolder``: ``root/train`` and ``root/val`` class folders (mini-ImageNet, ImageNet);
  random-resized crop and flip for training, resize and centre crop for evaluation.
- ``synthetic``: random images and labels of a given shape (smoke tests and benchmarks only).

Validation: ``data.val_fraction`` of the training set (default 0.1) is held out, stratified by class
and chosen by a fixed permutation (:data:`VAL_SPLIT_SEED`), so every run, seed and configuration
validates on the same images; they are seen without augmentation. The test set stays what it was
(CIFAR's test set, imagefolder's ``val_dir``, digits' fixed test split). ``val_fraction: 0`` trains
on the whole training set and has no validation set.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler, Subset, TensorDataset

from ..errors import UserError
from ..recipe import DataCfg
from .digits import NUM_CLASSES as DIGITS_CLASSES
from .digits import digits_tensors
from .shapes import NUM_CLASSES as SHAPES_CLASSES
from .shapes import shapes_tensors

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


#: The validation images are the same for every run: the split does not depend on trainer.seed.
VAL_SPLIT_SEED = 0


@dataclass
class DataBundle:
    train: Dataset
    test: Dataset
    num_classes: int
    in_chans: int
    img_size: int
    val: Dataset | None = None  # held out from the training data; None with data.val_fraction 0


def build_datasets(cfg: DataCfg) -> DataBundle:
    """The train, validation and test datasets for ``cfg`` (errors name what is missing and how to
    fix it)."""
    bundle, eval_view, labels = _source(cfg)
    if cfg.val_fraction == 0:
        return bundle
    train_idx, val_idx = stratified_split(labels, cfg.val_fraction)
    if not train_idx or not val_idx:
        raise UserError(
            f"data.val_fraction={cfg.val_fraction} leaves {len(train_idx)} training and {len(val_idx)} validation "
            f"images of {len(labels)}: choose a fraction strictly between 0 and 1, or 0 for no validation set"
        )
    bundle.val = Subset(eval_view, val_idx)
    bundle.train = Subset(bundle.train, train_idx)
    return bundle


def stratified_split(labels: Sequence[int], fraction: float, seed: int = VAL_SPLIT_SEED) -> tuple[list[int], list[int]]:
    """(train indices, validation indices), both sorted: of each class's n examples, round(fraction·n)
    -- at least one when n ≥ 2 -- go to validation, chosen by a permutation drawn from ``seed``."""
    labels = torch.as_tensor(list(labels) if not torch.is_tensor(labels) else labels)
    generator = torch.Generator().manual_seed(seed)
    val: list[int] = []
    for c in torch.unique(labels).tolist():
        members = torch.nonzero(labels == c).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        take = round(fraction * len(members))
        if len(members) >= 2:
            take = min(max(take, 1), len(members) - 1)
        else:
            take = 0
        val += members[:take].tolist()
    chosen = set(val)
    return [i for i in range(len(labels)) if i not in chosen], sorted(val)


def _source(cfg: DataCfg) -> tuple[DataBundle, Dataset, Sequence[int]]:
    """The dataset's own train/test split; a view of the training data with the evaluation
    transform (what validation sees) and the training labels (what the split stratifies)."""
    if cfg.name == "digits":
        size = cfg.img_size or 8
        x_train, y_train, x_test, y_test = digits_tensors(img_size=size)
        train = TensorDataset(x_train, y_train)
        return DataBundle(train, TensorDataset(x_test, y_test), DIGITS_CLASSES, 1, size), train, y_train
    if cfg.name == "synthetic":
        size = cfg.img_size or 32
        gen = torch.Generator().manual_seed(1234)
        shape = (cfg.channels, size, size)

        def make(n: int) -> TensorDataset:
            return TensorDataset(
                torch.randn(n, *shape, generator=gen), torch.randint(0, cfg.num_classes, (n,), generator=gen)
            )

        train = make(cfg.num_train or 512)
        bundle = DataBundle(train, make(cfg.num_test or 128), cfg.num_classes, cfg.channels, size)
        return bundle, train, train.tensors[1]
    if cfg.name == "shapes":
        size = cfg.img_size or 32
        x_train, y_train, x_test, y_test = shapes_tensors(cfg.num_train or 20000, cfg.num_test or 2000, size)
        train = TensorDataset(x_train, y_train)
        return DataBundle(train, TensorDataset(x_test, y_test), SHAPES_CLASSES, 3, size), train, y_train
    if cfg.name in ("cifar10", "cifar100"):
        return _cifar(cfg)
    if cfg.name == "imagefolder":
        return _imagefolder(cfg)
    raise UserError(f"unknown dataset '{cfg.name}'")  # the recipe schema already checks the name


def _with_transform(dataset, transform):
    """The same images (shared, not copied) seen through another transform."""
    view = copy.copy(dataset)
    view.transform = transform
    return view


def _cifar(cfg: DataCfg) -> tuple[DataBundle, Dataset, Sequence[int]]:
    from torchvision import datasets
    from torchvision import transforms as T

    cls = datasets.CIFAR10 if cfg.name == "cifar10" else datasets.CIFAR100
    size = cfg.img_size or 32
    normalize = [T.ToTensor(), T.Normalize(CIFAR_MEAN, CIFAR_STD)]
    resize = [T.Resize(size)] if size != 32 else []
    train_tf = T.Compose(
        resize + ([T.RandomCrop(size, padding=4), T.RandomHorizontalFlip()] if cfg.augment else []) + normalize
    )
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
    bundle = DataBundle(train, test, 10 if cfg.name == "cifar10" else 100, 3, size)
    return bundle, _with_transform(train, test_tf), train.targets


def _imagefolder(cfg: DataCfg) -> tuple[DataBundle, Dataset, Sequence[int]]:
    from torchvision import datasets
    from torchvision import transforms as T

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
            raise UserError(
                f"imagefolder: {folders[split]} is not a folder; expected {root}/{{{cfg.train_dir},"
                f"{cfg.val_dir}}}/<class>/<image> (set data.root, data.train_dir, data.val_dir)"
            )
    try:
        train = datasets.ImageFolder(str(folders["train"]), transform=train_tf)
        test = datasets.ImageFolder(str(folders["val"]), transform=test_tf)
    except (FileNotFoundError, RuntimeError) as exc:
        raise UserError(f"imagefolder under {root}: {exc}") from exc
    if train.classes != test.classes:
        raise UserError(f"imagefolder: {folders['train']} and {folders['val']} have different class folders")
    return DataBundle(train, test, len(train.classes), 3, size), _with_transform(train, test_tf), train.targets


def check_batch_fits(batch_size: int, train_images: int) -> None:
    """The one-line error for a global batch larger than the training set (training and --dry-run)."""
    if train_images < batch_size:
        raise UserError(f"trainer.batch_size={batch_size} is larger than the training set ({train_images} images)")


class ShardSampler(Sampler[int]):
    """Every index once across all processes (rank r takes r, r + world, ...), with no padding:
    evaluation sums reduced across processes are then exact."""

    def __init__(self, length: int, rank: int, world: int):
        self.indices = list(range(rank, length, world))

    def __iter__(self):
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


@dataclass
class Loaders:
    train: DataLoader
    val: DataLoader | None
    test: DataLoader
    sampler: DistributedSampler  # the training sampler: set_epoch(epoch) before each epoch


def build_loaders(
    bundle: DataBundle,
    cfg: DataCfg,
    batch_size: int,
    eval_batch_size: int,
    *,
    seed: int,
    rank: int,
    world: int,
    pin_memory: bool,
) -> Loaders:
    """Train/validation/test loaders. ``batch_size`` is global; each process loads ``batch_size // world``.

    The training sampler is a DistributedSampler in every case (one process is a world of 1), so the
    order of an epoch depends only on the seed and the epoch: resumed runs see the same batches.
    """
    if batch_size % world:
        raise UserError(f"trainer.batch_size={batch_size} does not split evenly over {world} processes")
    sampler = DistributedSampler(bundle.train, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=True)
    inner = bundle.train.dataset if isinstance(bundle.train, Subset) else bundle.train
    tensor_data = isinstance(inner, TensorDataset)  # already in memory: workers would only add overhead
    workers = 0 if tensor_data else cfg.num_workers
    common = dict(num_workers=workers, pin_memory=pin_memory, persistent_workers=workers > 0)
    if workers > 0:
        common["prefetch_factor"] = 4
    train = DataLoader(bundle.train, batch_size=batch_size // world, sampler=sampler, drop_last=True, **common)

    def evaluation(dataset: Dataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=max(1, eval_batch_size // world),
            sampler=ShardSampler(len(dataset), rank, world),
            **common,
        )

    if len(train) == 0:
        check_batch_fits(batch_size, len(bundle.train))
        raise UserError(f"trainer.batch_size={batch_size} leaves no full batch on each of {world} processes")
    return Loaders(train, evaluation(bundle.val) if bundle.val is not None else None, evaluation(bundle.test), sampler)
