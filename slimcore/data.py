"""Datasets: the embedded ``digits`` default, torchvision's CIFAR on-disk format, ImageFolder.

Training images are augmented per ``data.augment`` (see :class:`slimcore.config.DataConfig`).
All loaders are deterministic for a given seed and epoch (``set_epoch``), shard across
``world_size`` ranks like ``DistributedSampler``, and never download unless asked.
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from slimcore.config import AUGMENTS, DataConfig, RuntimeConfig
from slimcore.errors import DataError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR_STD = (0.2673, 0.2564, 0.2762)


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


def _digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled digits as (images 1797x8x8 in 0..16, labels).

    Read straight from the CSV that scikit-learn ships (importing scikit-learn itself costs
    over a second per stage); ``sklearn.datasets.load_digits`` is the fallback.
    """
    spec = importlib.util.find_spec("sklearn")
    origin = Path(spec.origin).parent if spec and spec.origin else None
    csv = origin / "datasets" / "data" / "digits.csv.gz" if origin else None
    if csv is not None and csv.is_file():
        with gzip.open(csv, "rt") as fh:
            table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
        return table[:, :-1].reshape(-1, 8, 8), table[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32), bunch.target.astype(np.int64)


class AugmentedTensors(Dataset):
    """In-memory images (N x C x H x W tensors) with a random transform applied per sample."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: object) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):  # type: ignore[no-untyped-def]
        return self.transform(self.images[index]), self.labels[index]


def _random_transforms(augment: str, image_size: int, fill: float = 0.0) -> list:  # type: ignore[type-arg]
    """The random part of a training transform (PIL images and CHW tensors alike)."""
    from torchvision import transforms as T

    if augment == "imagenet":
        return [T.RandomResizedCrop(image_size), T.RandomHorizontalFlip()]
    crop = [T.RandomCrop(image_size, padding=image_size // 8, fill=fill)] if augment == "crop+flip" else []
    flip = [T.RandomHorizontalFlip()] if augment in ("flip", "crop+flip") else []
    return [*crop, *flip]


def _check_digits_memory(n: int, size: int) -> None:
    """Refuse an ``image_size`` whose in-memory digits do not fit (1,024 px: tens of GB), before allocating.

    Peak: the 1-channel upsample, then the 3-channel normalised copy and its temporary (float32).
    """
    from slimcore.checks import check_memory

    check_memory(7 * n * size * size * 4, f"data.image_size: {size}: the digits set ({n} images of {size}x{size} "
                 "px, 3 channels, float32, held in memory)",
                 "lower data.image_size (the digits are 8x8 glyphs: 16-64 px is plenty)")


def _digits(cfg: DataConfig) -> Splits:
    """scikit-learn's bundled 8x8 digits (1,797 images), upsampled to ``image_size``, 3 channels.

    Images are normalised once, in memory; with ``augment: none`` (what ``auto`` gives digits)
    the splits are plain tensors, otherwise the training split draws its random transform per
    sample (padding with the background's value) and ``imagenet``'s test split is zoomed like
    its center crop.
    """
    raw_images, raw_labels = _digits_arrays()
    _check_digits_memory(len(raw_images), cfg.image_size)
    images = torch.from_numpy(raw_images / 16.0).unsqueeze(1)
    labels = torch.from_numpy(raw_labels)
    augment = cfg.augmentation()
    size = cfg.image_size

    def upsample(to: int) -> torch.Tensor:
        return F.interpolate(images, size=(to, to), mode="bilinear", align_corners=False).expand(-1, 3, -1, -1)

    train_images = upsample(size)
    # The split is a property of the data, not of the training seed: fixed at 0.
    train_idx, test_idx = stratified_split(raw_labels, cfg.test_fraction, seed=0)
    mean, std = train_images[train_idx].mean(), train_images[train_idx].std()
    train_images = ((train_images - mean) / std).contiguous()
    test_images = train_images
    if augment == "imagenet":  # evaluation as the recipe's: resize to 1.14x, center crop
        from torchvision.transforms.functional import center_crop

        test_images = ((center_crop(upsample(round(size * 1.14)), [size, size]) - mean) / std).contiguous()
    test = TensorDataset(test_images[test_idx], labels[test_idx])
    if augment == "none":
        train: Dataset = TensorDataset(train_images[train_idx], labels[train_idx])
    else:
        from torchvision import transforms as T

        background = float(-mean / std)  # a raw 0 (the digits' background), normalised
        train = AugmentedTensors(train_images[train_idx], labels[train_idx],
                                 T.Compose(_random_transforms(augment, size, fill=background)))
    return Splits(train=train, test=test, num_classes=10, name="digits")


def image_transforms(augment: str, image_size: int, train: bool, mean: tuple[float, ...],
                     std: tuple[float, ...]):  # type: ignore[no-untyped-def]
    """PIL image -> normalised tensor, for one split, per ``data.augment`` (resolved, never ``auto``).

    Evaluation never randomises: resize (shorter side) + center crop to ``image_size``, from
    ``1.14 * image_size`` for ``imagenet``.  Training: ``none`` is the evaluation transform,
    ``flip``/``crop+flip`` add a horizontal flip / a padded random crop and a flip to it,
    ``imagenet`` is ``RandomResizedCrop`` + flip.
    """
    from torchvision import transforms as T

    if augment not in AUGMENTS or augment == "auto":
        raise ValueError(f"augment must be one of {', '.join(a for a in AUGMENTS if a != 'auto')}, got {augment!r}")
    norm = [T.ToTensor(), T.Normalize(mean, std)]
    if train and augment == "imagenet":
        return T.Compose([*_random_transforms(augment, image_size), *norm])
    resize = round(image_size * 1.14) if augment == "imagenet" else image_size
    fixed = [T.Resize(resize), T.CenterCrop(image_size)]
    return T.Compose([*fixed, *(_random_transforms(augment, image_size) if train else []), *norm])


_CIFAR_LAYOUT = {
    # name: (folder, train files, test files, meta file, label-names key, labels key)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", "label_names", "labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_label_names", "fine_labels"),
}
# Constructors of arrays, dtypes and scalars from raw bytes (what numpy pickles hold, for any
# pickle protocol): data in, data out, nothing else can be called.
_NUMPY_GLOBALS = {(prefix + mod, name) for prefix in ("numpy.core.", "numpy._core.")
                  for mod, name in (("multiarray", "_reconstruct"), ("multiarray", "scalar"),
                                    ("numeric", "_frombuffer"))} | {("numpy", "ndarray"), ("numpy", "dtype")}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    """Reads CIFAR's pickled batches while refusing anything but numpy arrays and builtins."""

    def find_class(self, module: str, name: str):  # type: ignore[no-untyped-def]
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")


def _read_batch(path: Path) -> dict:
    with path.open("rb") as fh:
        return _ArraysOnlyUnpickler(fh, encoding="latin1").load()


class CifarFolder(Dataset):
    """One split of torchvision's CIFAR-10/100 on-disk format (python pickles), read locally.

    Unlike torchvision's class this does not check the official files' checksums (so tests and
    users can use reduced copies), and it never unpickles anything but arrays.
    """

    def __init__(self, root: Path, name: str, train: bool, transform: object | None = None) -> None:
        folder_name, train_files, test_files, meta_file, names_key, labels_key = _CIFAR_LAYOUT[name]
        folder = root / folder_name
        files = train_files if train else test_files
        missing = [f for f in [*files, meta_file] if not (folder / f).is_file()]
        if missing:
            raise DataError(
                f"data.root: {folder} is not a {name} copy: missing {', '.join(missing)} "
                f"(expected torchvision's layout {folder_name}/{{{', '.join([*files, meta_file])}}}); "
                "set data.download: true to fetch it, or point data.root at your copy"
            )
        try:
            batches = [_read_batch(folder / f) for f in files]
            self.classes = list(_read_batch(folder / meta_file)[names_key])
            data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
            self.targets = [int(t) for b in batches for t in b[labels_key]]
        except (pickle.UnpicklingError, KeyError, EOFError, ValueError, TypeError) as err:
            raise DataError(f"data.root: {folder} holds an unreadable {name} file: {err}") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(self.targets):
            raise DataError(f"data.root: {folder}: expected N x 3072 uint8 images and N labels, got images of "
                            f"shape {data.shape} and {len(self.targets)} labels")
        bad = [t for t in self.targets if not 0 <= t < len(self.classes)]
        if bad:
            raise DataError(f"data.root: {folder}: labels must be in [0, {len(self.classes)}) for its "
                            f"{len(self.classes)} class names, found {sorted(set(bad))[:5]}")
        self.data = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # HWC, as torchvision
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):  # type: ignore[no-untyped-def]
        from PIL import Image

        image = Image.fromarray(self.data[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def _cifar(cfg: DataConfig) -> Splits:
    """CIFAR-10/100 in torchvision's on-disk format under ``root`` (downloads only if asked)."""
    root = Path(cfg.root)
    if cfg.download:
        from torchvision import datasets

        cls = datasets.CIFAR10 if cfg.name == "cifar10" else datasets.CIFAR100
        cls(str(root), train=True, download=True)  # torchvision verifies the official checksums
    parts = [CifarFolder(root, cfg.name, train,
                         image_transforms(cfg.augmentation(), cfg.image_size, train, CIFAR_MEAN, CIFAR_STD))
             for train in (True, False)]
    return Splits(parts[0], parts[1], num_classes=len(parts[0].classes), name=cfg.name)


def _imagefolder(cfg: DataConfig) -> Splits:
    """``root/train/<class>/*`` and ``root/val/<class>/*`` image folders."""
    from slimcore.imagescan import CheckedImageFolder

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
            parts[split] = CheckedImageFolder(  # refuses symlink loops, broken links, empty files
                str(folder),
                transform=image_transforms(cfg.augmentation(), cfg.image_size, split == "train",
                                           IMAGENET_MEAN, IMAGENET_STD),
            )
        except (FileNotFoundError, RuntimeError) as err:
            raise DataError(f"data.root: {folder}: {err}") from None
    if parts["train"].classes != parts["val"].classes:
        only_train = sorted(set(parts["train"].classes) - set(parts["val"].classes))[:5]
        only_val = sorted(set(parts["val"].classes) - set(parts["train"].classes))[:5]
        raise DataError(
            f"data.root: class folders differ between {root}/train ({len(parts['train'].classes)}) "
            f"and {root}/val ({len(parts['val'].classes)}): only in train {only_train}, only in val {only_val}"
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


__all__ = ["AugmentedTensors", "DataError", "Splits", "check_num_classes", "image_transforms", "load_splits",
           "make_loader", "stratified_split"]
