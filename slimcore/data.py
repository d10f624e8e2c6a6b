"""Datasets: the embedded ``digits`` default, torchvision's CIFAR on-disk format, ImageFolder.

Every format gives three splits (:class:`Splits`): ``train``, ``val`` and ``test``.  ``val`` is a
fixed stratified ``data.val_fraction`` of the format's training images, seeded by ``params.seed``
(:attr:`slimcore.config.DataConfig.split_seed`), held out of ``train`` and always read with the
evaluation transform; only the sensitivity stage reads it.  ``test`` is never touched by it.
Training images are augmented per ``data.augment`` (see :class:`slimcore.config.DataConfig`).
All loaders are deterministic for a given seed and epoch (``set_epoch``), shard across
``world_size`` ranks like ``DistributedSampler``, and never download unless asked.
"""

from __future__ import annotations

import copy
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
    """Train, validation and test datasets plus what a model needs to know about them.

    ``val`` is held out of ``train`` (a stratified ``data.val_fraction`` of the format's
    training images) and read with the evaluation transform; ``test`` is the format's own test
    split (digits: a fixed ``data.test_fraction``; cifar: the test batch; imagefolder: ``root/val``).
    """

    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    name: str


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int,
                     min_left: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of a fixed stratified train/test split (same seed, same split).

    Each class gives ``round(n * test_fraction)`` of its ``n`` samples, at least one, but never
    so many that fewer than ``min_left`` stay on the train side.
    """
    rng = np.random.default_rng(seed)
    train_idx, test_idx = [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        n_test = max(0, min(max(1, round(len(idx) * test_fraction)), len(idx) - min_left))
        test_idx.append(idx[:n_test])
        train_idx.append(idx[n_test:])
    return np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(test_idx))


def validation_split(labels: np.ndarray, cfg: DataConfig, seed: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) positions in a training split with these ``labels``: ``cfg.val_fraction`` of each
    class, drawn with ``seed`` (default ``cfg.split_seed``, i.e. ``params.seed``); a class never
    gives away its last training sample."""
    return stratified_split(np.asarray(labels), cfg.val_fraction, cfg.split_seed if seed is None else seed,
                            min_left=1)


def _select(dataset: Dataset, positions: np.ndarray, transform: object) -> Dataset:
    """A copy of a CifarFolder / ImageFolder holding only the samples at ``positions``, read with
    ``transform`` (its class list and everything else shared; the original is not modified)."""
    part = copy.copy(dataset)
    keep = [int(i) for i in positions]
    if isinstance(dataset, CifarFolder):
        part.data = dataset.data[keep]
    else:  # torchvision's DatasetFolder: samples (and its alias imgs) are (path, class) pairs
        part.samples = [dataset.samples[i] for i in keep]
        part.imgs = part.samples
        from torchvision.datasets.vision import StandardTransform

        part.transforms = StandardTransform(transform, getattr(dataset, "target_transform", None))
    part.targets = [dataset.targets[i] for i in keep]
    part.transform = transform
    return part


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


def _digits(cfg: DataConfig, seed: int | None = None) -> Splits:
    """scikit-learn's bundled 8x8 digits (1,797 images), upsampled to ``image_size``, 3 channels.

    Images are normalised once, in memory (with the statistics of ``train``); with ``augment:
    none`` (what ``auto`` gives digits) the splits are plain tensors, otherwise the training split
    draws its random transform per sample (padding with the background's value) and
    ``imagenet``'s evaluation splits (val, test) are zoomed like
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
    # The test split is a property of the data, not of the training seed: fixed at 0.
    train_part, test_idx = stratified_split(raw_labels, cfg.test_fraction, seed=0)
    fit, held = validation_split(raw_labels[train_part], cfg, seed)
    train_idx, val_idx = train_part[fit], train_part[held]
    mean, std = train_images[train_idx].mean(), train_images[train_idx].std()
    train_images = ((train_images - mean) / std).contiguous()
    test_images = train_images
    if augment == "imagenet":  # evaluation as the recipe's: resize to 1.14x, center crop
        from torchvision.transforms.functional import center_crop

        test_images = ((center_crop(upsample(round(size * 1.14)), [size, size]) - mean) / std).contiguous()
    test = TensorDataset(test_images[test_idx], labels[test_idx])
    val = TensorDataset(test_images[val_idx], labels[val_idx])  # evaluation images, as test
    if augment == "none":
        train: Dataset = TensorDataset(train_images[train_idx], labels[train_idx])
    else:
        from torchvision import transforms as T

        background = float(-mean / std)  # a raw 0 (the digits' background), normalised
        train = AugmentedTensors(train_images[train_idx], labels[train_idx],
                                 T.Compose(_random_transforms(augment, size, fill=background)))
    return Splits(train=train, val=val, test=test, num_classes=10, name="digits")


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


def _cifar(cfg: DataConfig, seed: int | None = None) -> Splits:
    """CIFAR-10/100 in torchvision's on-disk format under ``root`` (downloads only if asked);
    ``val`` is held out of the training batches."""
    root = Path(cfg.root)
    if cfg.download:
        from torchvision import datasets

        cls = datasets.CIFAR10 if cfg.name == "cifar10" else datasets.CIFAR100
        cls(str(root), train=True, download=True)  # torchvision verifies the official checksums
    augment, size = cfg.augmentation(), cfg.image_size
    evaluation = image_transforms(augment, size, False, CIFAR_MEAN, CIFAR_STD)
    full = CifarFolder(root, cfg.name, True)
    test = CifarFolder(root, cfg.name, False, evaluation)
    fit, held = validation_split(np.asarray(full.targets), cfg, seed)
    train = _select(full, fit, image_transforms(augment, size, True, CIFAR_MEAN, CIFAR_STD))
    return Splits(train, _select(full, held, evaluation), test, num_classes=len(full.classes), name=cfg.name)


def _imagefolder(cfg: DataConfig, seed: int | None = None) -> Splits:
    """``root/train/<class>/*`` and ``root/val/<class>/*`` image folders: ``root/val`` is the test
    split; the validation split is held out of ``root/train``."""
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
    full = parts["train"]
    fit, held = validation_split(np.asarray(full.targets), cfg, seed)
    evaluation = image_transforms(cfg.augmentation(), cfg.image_size, False, IMAGENET_MEAN, IMAGENET_STD)
    return Splits(_select(full, fit, full.transform), _select(full, held, evaluation), parts["val"],
                  num_classes=len(full.classes), name="imagefolder")


def load_splits(cfg: DataConfig, seed: int | None = None) -> Splits:
    """The train, validation and test splits of the configured dataset.

    ``seed`` draws the validation split; by default ``cfg.split_seed``, which is ``params.seed``
    for the ``data`` section of validated params, so that every stage holds out the same images.
    """
    if cfg.name == "digits":
        return _digits(cfg, seed)
    if cfg.name in ("cifar10", "cifar100"):
        return _cifar(cfg, seed)
    return _imagefolder(cfg, seed)


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
           "make_loader", "stratified_split", "validation_split"]
