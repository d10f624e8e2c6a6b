"""Datasets: the embedded ``digits`` default, torchvision's CIFAR on-disk format, ImageFolder.

All loaders are deterministic for a given seed and epoch (``set_epoch``), shard across
``world_size`` ranks like ``DistributedSampler``, and never download unless asked.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from slimcore.config import DataConfig, RuntimeConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR_STD = (0.2673, 0.2564, 0.2762)


class DataError(ValueError):
    """A dataset root is missing, has the wrong layout or disagrees with a checkpoint."""


@dataclass
class Splits:
    """Train and test datasets plus what a model needs to know about them."""

    train: Dataset
    test: Dataset
    num_classes: int
    name: str


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a fixed stratified train/test split (same seed, same split)."""
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n_test = max(1, round(len(idx) * test_fraction))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))


def _digits(cfg: DataConfig) -> Splits:
    """scikit-learn's bundled 8x8 digits (1,797 images), upsampled to ``image_size``, 3 channels."""
    from sklearn.datasets import load_digits  # bundled with scikit-learn: no download

    bunch = load_digits()
    images = torch.from_numpy(bunch.images.astype(np.float32) / 16.0).unsqueeze(1)
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    images = F.interpolate(images, size=(cfg.image_size, cfg.image_size), mode="bilinear",
                           align_corners=False).expand(-1, 3, -1, -1)
    # The split is a property of the data, not of the training seed: fixed at 0.
    train_idx, test_idx = stratified_split(bunch.target, cfg.test_fraction, seed=0)
    mean, std = images[train_idx].mean(), images[train_idx].std()
    images = ((images - mean) / std).contiguous()
    return Splits(
        train=TensorDataset(images[train_idx], labels[train_idx]),
        test=TensorDataset(images[test_idx], labels[test_idx]),
        num_classes=10,
        name="digits",
    )


def _transforms(image_size: int, train: bool, mean: tuple[float, ...], std: tuple[float, ...],
                random_resized: bool):  # type: ignore[no-untyped-def]
    from torchvision import transforms as T

    norm = [T.ToTensor(), T.Normalize(mean, std)]
    if not train:
        resize = int(round(image_size * 1.14)) if random_resized else image_size
        crop = [T.CenterCrop(image_size)] if random_resized else []
        return T.Compose([T.Resize(resize), *crop, *norm])
    if random_resized:
        return T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), *norm])
    return T.Compose([T.Resize(image_size), T.RandomCrop(image_size, padding=image_size // 8),
                      T.RandomHorizontalFlip(), *norm])


def _cifar(cfg: DataConfig) -> Splits:
    """torchvision's CIFAR-10/100 on-disk format under ``root`` (downloads only if asked)."""
    from torchvision import datasets

    root = Path(cfg.root)
    cls = datasets.CIFAR10 if cfg.name == "cifar10" else datasets.CIFAR100
    folder = root / cls.base_folder
    if not cfg.download and not folder.is_dir():
        raise DataError(
            f"data.root: {folder} not found: expected torchvision's {cfg.name} layout "
            f"({cls.base_folder}/ with the python pickles) under {root}; "
            "set data.download: true to fetch it, or point data.root at your copy"
        )
    try:
        make = lambda train: cls(str(root), train=train, download=cfg.download,  # noqa: E731
                                 transform=_transforms(cfg.image_size, train, CIFAR_MEAN, CIFAR_STD, False))
        train, test = make(True), make(False)
    except RuntimeError as err:
        raise DataError(f"data.root: {folder} is not a valid {cfg.name} copy: {err}") from None
    return Splits(train, test, num_classes=len(train.classes), name=cfg.name)


def _imagefolder(cfg: DataConfig) -> Splits:
    """``root/train/<class>/*`` and ``root/val/<class>/*`` image folders."""
    from torchvision import datasets

    root = Path(cfg.root)
    parts = {}
    for split in ("train", "val"):
        folder = root / split
        if not folder.is_dir():
            raise DataError(
                f"data.root: {folder} not found: imagefolder expects {root}/train/<class>/<image> "
                f"and {root}/val/<class>/<image>"
            )
        try:
            parts[split] = datasets.ImageFolder(
                str(folder),
                transform=_transforms(cfg.image_size, split == "train", IMAGENET_MEAN, IMAGENET_STD, True),
            )
        except (FileNotFoundError, RuntimeError) as err:
            raise DataError(f"data.root: {folder}: {err}") from None
    if parts["train"].classes != parts["val"].classes:
        raise DataError(
            f"data.root: class folders differ between {root}/train ({len(parts['train'].classes)}) "
            f"and {root}/val ({len(parts['val'].classes)})"
        )
    return Splits(parts["train"], parts["val"], num_classes=len(parts["train"].classes), name="imagefolder")


def load_splits(cfg: DataConfig) -> Splits:
    """The train and test splits of the configured dataset."""
    if cfg.name == "digits":
        return _digits(cfg)
    if cfg.name in ("cifar10", "cifar100"):
        return _cifar(cfg)
    return _imagefolder(cfg)


def check_num_classes(splits: Splits, expected: int, source: str) -> None:
    """Refuse a checkpoint whose classifier disagrees with the data."""
    if splits.num_classes != expected:
        raise DataError(
            f"{source} has {expected} classes but data {splits.name!r} has {splits.num_classes}: "
            "train on the same data, or change data.name/data.root"
        )


def make_loader(dataset: Dataset, batch_size: int, *, train: bool, seed: int, runtime: RuntimeConfig,
                rank: int = 0, world_size: int = 1, device: str = "cpu") -> DataLoader:
    """A DataLoader whose order depends only on (seed, epoch): call ``loader.sampler.set_epoch``.

    Each rank sees ``batch_size`` samples a step (so the global batch is ``batch_size *
    world_size``); training drops the last partial batch so every step has equal weight.
    """
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=train,
                                 seed=seed, drop_last=False)
    pin = runtime.pin_memory == "on" or (runtime.pin_memory == "auto" and device == "cuda")
    workers = runtime.num_workers
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, drop_last=train,
        num_workers=workers, pin_memory=pin,
        persistent_workers=runtime.persistent_workers and workers > 0,
    )


__all__ = ["DataError", "Splits", "check_num_classes", "load_splits", "make_loader", "stratified_split"]
