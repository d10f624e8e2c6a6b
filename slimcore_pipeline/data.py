"""Datasets: the embedded ``digits`` default, torchvision's on-disk formats read locally, ImageFolder.

``data.name`` and what ``data.root`` must hold (nothing is downloaded, except CIFAR with
``data.download: true``; no checksum is verified, so reduced copies work):

- ``mnist``, ``fashionmnist``, ``kmnist``: the idx files ``train-images-idx3-ubyte``,
  ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each plain
  or ``.gz``, either flat in ``root`` (as Debian's ``dataset-fashion-mnist`` installs them in
  ``/usr/share/datasets/fashion-mnist``) or in torchvision's ``root/MNIST/raw/`` (``FashionMNIST``,
  ``KMNIST``).  28x28 grayscale, read as 3 identical channels.
- ``cifar10``, ``cifar100``: torchvision's ``cifar-10-batches-py/`` / ``cifar-100-python/`` pickles
  (nothing but arrays is ever unpickled).
- ``svhn``: torchvision's ``train_32x32.mat`` and ``test_32x32.mat`` in ``root`` (``extra`` is not
  read; label 10 is digit 0, as torchvision).
- ``stl10``: torchvision's ``root/stl10_binary/{train,test}_{X,y}.bin`` (the unlabeled split is
  not read); 96x96 colour.
- ``imagefolder``: ``root/train/<class>/*`` and ``root/val/<class>/*`` (the test split); hidden
  files and folders (``.ipynb_checkpoints/``) are skipped, 16-bit images scaled from 0..65535.

Every format gives three splits (:class:`Splits`): ``train``, ``val`` and ``test``.  With
``data.train_per_class`` > 0 only a stratified subset of the format's training images is used
(at most that many per class, drawn with a fixed seed); ``val`` is then a fixed stratified
``data.val_fraction`` of those, seeded by ``params.seed`` (:attr:`slimcore_pipeline.config.DataConfig.split_seed`),
held out of ``train`` and always read with the evaluation transform.  ``test`` is the format's own
test split, never touched by either.  Inputs are normalised with per-channel statistics of the
``train`` part (after subset and hold-out), recorded in :attr:`Splits.normalization`; an
imagefolder uses ImageNet's.  Training images are augmented per ``data.augment`` (see
:class:`slimcore_pipeline.config.DataConfig`).  All loaders are deterministic for a given seed and epoch
(``set_epoch``) and shard across ``world_size`` ranks like ``DistributedSampler``.
"""

from __future__ import annotations

import copy
import gzip
import importlib.util
import math
import pickle
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, DistributedSampler, TensorDataset

from slimcore.errors import DataError
from slimcore_pipeline.config import AUGMENTS, DataConfig, RuntimeConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# CIFAR-100's training statistics: no longer used to normalise (every format measures its own
# training part), kept for callers that imported them
CIFAR_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR_STD = (0.2673, 0.2564, 0.2762)
SUBSET_SEED = 0  # data.train_per_class draws its subset with this seed, whatever params.seed


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
    # what every split's inputs are normalised with: {"mean": [r, g, b], "std": [r, g, b]} on the
    # [0, 1] scale the images are read at (digits: value / 16), measured on ``train``
    normalization: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what a stage should tell the user (a short class)


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


def train_subset(labels: np.ndarray, per_class: int, seed: int = SUBSET_SEED) -> tuple[np.ndarray, list[str]]:
    """Sorted positions of at most ``per_class`` samples of each class (``data.train_per_class``;
    all of them for 0), drawn with ``seed``, and a note naming any class that holds fewer (it
    keeps all of its own)."""
    labels = np.asarray(labels)
    if per_class <= 0:
        return np.arange(len(labels)), []
    rng = np.random.default_rng(seed)
    keep, short = [], []
    for cls in np.unique(labels):
        idx = np.flatnonzero(labels == cls)
        rng.shuffle(idx)
        keep.append(idx[:per_class])
        if len(idx) < per_class:
            short.append(f"{cls} ({len(idx)})")
    notes = [f"data.train_per_class: {per_class}, but {len(short)} class(es) hold fewer training images and "
             f"keep all of them: class (images) {', '.join(short[:5])}{' ...' if len(short) > 5 else ''}"] \
        if short else []
    return np.sort(np.concatenate(keep)) if keep else np.arange(0), notes


def channel_stats(data: np.ndarray, positions: np.ndarray, chunk: int = 4096) -> dict[str, list[float]]:
    """Per-channel mean and standard deviation (population, 6 decimals) of the uint8 images
    ``data[positions]`` (N x H x W x C, or N x H x W grayscale: its value for each of 3 channels),
    on ToTensor's [0, 1] scale.  Exact, from 256-bin histograms: no float copy of the images."""
    if len(positions) == 0:
        raise DataError("no training images to measure the normalisation statistics on")
    channels = data.shape[3] if data.ndim == 4 else 1
    counts = np.zeros((channels, 256), np.int64)
    for start in range(0, len(positions), chunk):
        block = data[np.asarray(positions[start:start + chunk])].reshape(-1, channels)
        for c in range(channels):
            counts[c] += np.bincount(block[:, c], minlength=256)
    values = np.arange(256, dtype=np.float64) / 255.0
    n = counts.sum(1)
    mean = counts @ values / n
    var = np.maximum(counts @ values ** 2 / n - mean ** 2, 0.0)
    std = np.where(var > 0, np.sqrt(var), 1.0)  # a constant channel: leave its scale alone
    if channels == 1:
        mean, std = np.repeat(mean, 3), np.repeat(std, 3)
    return {"mean": [round(float(m), 6) for m in mean], "std": [round(float(s), 6) for s in std]}


def _select(dataset: Dataset, positions: np.ndarray, transform: object) -> Dataset:
    """A copy of an ArrayImages (CifarFolder, ...) / ImageFolder holding only the samples at
    ``positions``, read with ``transform`` (its class list and everything else shared; the
    original is not modified)."""
    part = copy.copy(dataset)
    keep = [int(i) for i in positions]
    if isinstance(dataset, ArrayImages):
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
    from slimcore_pipeline.resources import check_memory

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
    notes: list[str] = []
    if cfg.train_per_class:
        subset, notes = train_subset(raw_labels[train_part], cfg.train_per_class)
        train_part = train_part[subset]
    fit, held = validation_split(raw_labels[train_part], cfg, seed)
    train_idx, val_idx = train_part[fit], train_part[held]
    mean, std = train_images[train_idx].mean(), train_images[train_idx].std()
    stats = {"mean": [round(float(mean), 6)] * 3, "std": [round(float(std), 6)] * 3}
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
    return Splits(train=train, val=val, test=test, num_classes=10, name="digits", normalization=stats,
                  notes=notes)


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
    """Reads CIFAR's pickled batches while refusing anything but numpy arrays and builtins.

    Every array is bounded before it is allocated: numpy's ``_reconstruct`` allocates the shape it
    is given (a real pickle passes ``(0,)`` and fills the array from bytes it holds), so a shape
    whose size exceeds ``max_bytes`` (the file's own size: its data must be in the file) is refused
    instead of allocating terabytes.
    """

    def __init__(self, file: Any, max_bytes: int, **kwargs: Any) -> None:
        super().__init__(file, **kwargs)
        self.max_bytes = max_bytes

    def find_class(self, module: str, name: str):  # type: ignore[no-untyped-def]
        if (module, name) not in _NUMPY_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a dataset file")
        found = super().find_class(module, name)
        if name != "_reconstruct":
            return found
        limit = self.max_bytes

        def reconstruct(subtype: Any, shape: Any, dtype: Any) -> Any:
            dims = (shape,) if isinstance(shape, int) else tuple(shape)
            if not all(isinstance(d, int) and d >= 0 for d in dims):
                raise pickle.UnpicklingError(f"an array of shape {dims!r}: not a shape")
            nbytes = math.prod(dims) * np.dtype(dtype).itemsize
            if nbytes > limit:
                raise pickle.UnpicklingError(f"an array of shape {dims} would take {nbytes:,} bytes, more than "
                                             f"the file's {limit:,}: a crafted or corrupt file")
            return found(subtype, shape, dtype)

        return reconstruct


def _read_batch(path: Path) -> dict:
    with path.open("rb") as fh:
        return _ArraysOnlyUnpickler(fh, max_bytes=max(path.stat().st_size, 1), encoding="latin1").load()


class ArrayImages(Dataset):
    """One split of images held in memory: ``data`` uint8, N x H x W x 3 (RGB) or N x H x W
    (grayscale, read as 3 identical channels), ``targets`` its labels, ``classes`` their names;
    each image goes through ``transform`` as a PIL RGB image."""

    def __init__(self, data: np.ndarray, targets: list[int], classes: list[str],
                 transform: object | None = None) -> None:
        self.data, self.targets, self.classes, self.transform = data, targets, classes, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int):  # type: ignore[no-untyped-def]
        from PIL import Image

        image = Image.fromarray(self.data[index])
        if image.mode != "RGB":  # grayscale: the models take 3 channels
            image = image.convert("RGB")
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


class CifarFolder(ArrayImages):
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
        current = folder / meta_file
        try:
            batches = []
            for f in files:
                current = folder / f
                batches.append(_read_batch(current))
            current = folder / meta_file
            self.classes = list(_read_batch(current)[names_key])
            current = folder
            data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
            self.targets = [int(t) for b in batches for t in b[labels_key]]
        except (pickle.UnpicklingError, KeyError, EOFError, ValueError, TypeError, AttributeError, IndexError,
                MemoryError, RecursionError) as err:
            what = f"{type(err).__name__}: {err}" if isinstance(err, (KeyError, MemoryError)) else str(err)
            raise DataError(f"data.root: {current}: unreadable {name} file ({' '.join(what.split())}); "
                            "replace it with torchvision's copy") from None
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(data) != len(self.targets):
            raise DataError(f"data.root: {folder}: expected N x 3072 uint8 images and N labels, got images of "
                            f"shape {data.shape} and {len(self.targets)} labels")
        bad = [t for t in self.targets if not 0 <= t < len(self.classes)]
        if bad:
            raise DataError(f"data.root: {folder}: labels must be in [0, {len(self.classes)}) for its "
                            f"{len(self.classes)} class names, found {sorted(set(bad))[:5]}")
        self.data = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)  # HWC, as torchvision
        self.transform = transform


# --------------------------------------------------------------------------------------------
# the MNIST family: idx files
# --------------------------------------------------------------------------------------------

_IDX_FAMILY = {
    # data.name: (torchvision's class, and so its folder root/<class>/raw/; what it is called; class names)
    "mnist": ("MNIST", "MNIST", [f"{i} - {w}" for i, w in enumerate(
        "zero one two three four five six seven eight nine".split())]),
    "fashionmnist": ("FashionMNIST", "Fashion-MNIST", ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                                       "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]),
    "kmnist": ("KMNIST", "Kuzushiji-MNIST", ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]),
}
_IDX_FILES = {True: ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
              False: ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_IDX_UINT8 = 0x08
_GZIP_MAX_RATIO = 1100  # deflate expands at most ~1032x: a header claiming more than this is a lie
_READ_CHUNK = 1 << 24


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """A uint8 array from an idx file (LeCun's format: bytes 0 0 0x08 ``ndim``, ``ndim`` big-endian
    uint32 sizes, then the values), plain or gzipped (``.gz``).

    The sizes in the header are checked against the file before anything is allocated: a plain
    file must hold exactly that many bytes, a ``.gz`` can hold at most ~1,000x its size, and the
    memory must be there; a truncated or overlong file is refused.
    """
    gz = path.name.endswith(".gz")
    what = f"data.root: {path}"
    try:
        with gzip.open(path, "rb") if gz else path.open("rb") as fh:
            head = fh.read(4)
            if len(head) < 4 or head[:2] != b"\0\0" or head[2] != _IDX_UINT8 or head[3] != ndim:
                raise DataError(f"{what} is not a uint8 idx file of {ndim} dimension(s): it starts with "
                                f"{head.hex() or 'nothing'}, expected 000008{ndim:02x}; point data.root at the "
                                "dataset's idx files")
            dims_raw = fh.read(4 * ndim)
            if len(dims_raw) < 4 * ndim:
                raise DataError(f"{what}: truncated idx header; replace the file with a complete copy")
            dims = struct.unpack(f">{ndim}I", dims_raw)
            count = math.prod(dims)
            size = path.stat().st_size
            if (not gz and size != 4 + 4 * ndim + count) or (gz and count > _GZIP_MAX_RATIO * size):
                raise DataError(f"{what}: its header says {'x'.join(map(str, dims))} values but the file holds "
                                f"{size} {'compressed ' if gz else ''}bytes; replace it with a complete copy")
            from slimcore_pipeline.resources import check_memory

            check_memory(count, f"{what} ({'x'.join(map(str, dims))} uint8 values)", "use a machine with more memory")
            buffer = bytearray(count)
            view, got = memoryview(buffer), 0
            while got < count:
                n = fh.readinto(view[got:got + _READ_CHUNK])
                if not n:
                    break
                got += n
            if got != count or fh.read(1):
                raise DataError(f"{what}: holds {'fewer' if got != count else 'more'} values than its header's "
                                f"{'x'.join(map(str, dims))}; replace it with a complete copy")
    except (OSError, EOFError, zlib.error) as err:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{what}: unreadable ({err}); replace it with a complete copy") from None
    return np.frombuffer(buffer, np.uint8).reshape(dims)


def _idx_file(folder: Path, stem: str) -> Path | None:
    for name in (stem, f"{stem}.gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _idx_folder(root: Path, name: str) -> Path:
    """The folder holding ``name``'s four idx files: ``root`` itself (flat, as Debian installs
    them) or torchvision's ``root/<Class>/raw``."""
    cls, title, _ = _IDX_FAMILY[name]
    stems = [*_IDX_FILES[True], *_IDX_FILES[False]]
    candidates = [root, root / cls / "raw"]
    for folder in candidates:
        if all(_idx_file(folder, stem) for stem in stems):
            return folder
    partial = next((f for f in candidates if any(_idx_file(f, stem) for stem in stems)), None)
    if partial is not None:
        missing = [stem for stem in stems if not _idx_file(partial, stem)]
        raise DataError(f"data.root: {partial} holds only part of {title}: missing {', '.join(missing)}[.gz]; "
                        "add the missing files")
    raise DataError(f"data.root: {root} holds no {title} idx files (expected {', '.join(stems)}, each plain or "
                    f".gz, in {root}/ or torchvision's {root}/{cls}/raw/); point data.root at the folder that "
                    "holds them")


def _read_idx_split(folder: Path, name: str, train: bool) -> ArrayImages:
    images_stem, labels_stem = _IDX_FILES[train]
    images_path, labels_path = _idx_file(folder, images_stem), _idx_file(folder, labels_stem)
    assert images_path is not None and labels_path is not None  # found by _idx_folder
    images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)
    classes = _IDX_FAMILY[name][2]
    if len(images) != len(labels) or len(images) == 0 or 0 in images.shape[1:]:
        raise DataError(f"data.root: {images_path} holds {images.shape[0]} images of {images.shape[1]}x"
                        f"{images.shape[2]} px and {labels_path} {len(labels)} labels: expected as many labels "
                        "as images, at least one; use files of the same split")
    if labels.max() >= len(classes):
        raise DataError(f"data.root: {labels_path}: labels must be in [0, {len(classes)}), found {int(labels.max())}")
    return ArrayImages(images, labels.astype(np.int64).tolist(), list(classes))


# --------------------------------------------------------------------------------------------
# SVHN (.mat) and STL-10 (.bin)
# --------------------------------------------------------------------------------------------

SVHN_FILES = {True: "train_32x32.mat", False: "test_32x32.mat"}
STL10_CLASSES = ["airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck"]
STL10_SIDE = 96


def _read_svhn(root: Path, train: bool) -> ArrayImages:
    """torchvision's SVHN ``root/{train,test}_32x32.mat`` (MATLAB v5: ``X`` 32x32x3xN, ``y`` Nx1 in 1..10;
    10 is the digit 0, as torchvision reads it)."""
    path = root / SVHN_FILES[train]
    if not path.is_file():
        raise DataError(f"data.root: {root} holds no {path.name} (SVHN in torchvision's format: "
                        f"{root}/{SVHN_FILES[True]} and {root}/{SVHN_FILES[False]}); point data.root at the "
                        "folder that holds them")
    import scipy.io

    try:
        mat = scipy.io.loadmat(str(path), variable_names=["X", "y"])
    except (ValueError, TypeError, OSError, NotImplementedError, MemoryError) as err:
        raise DataError(f"data.root: {path}: not a readable MATLAB v5 file ({err}); replace it with "
                        "torchvision's copy") from None
    x, y = mat.get("X"), mat.get("y")
    if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray) or x.dtype != np.uint8 or x.ndim != 4 \
            or x.shape[2] != 3 or y.size != x.shape[3] or x.shape[3] == 0:
        raise DataError(f"data.root: {path}: expected X (H x W x 3 x N, uint8) and y (N labels), got X "
                        f"{getattr(x, 'shape', None)} {getattr(x, 'dtype', None)} and y {getattr(y, 'shape', None)}")
    labels = y.reshape(-1).astype(np.int64)
    if labels.min() < 0 or labels.max() > 10:
        raise DataError(f"data.root: {path}: labels must be in 1..10 (10: the digit 0), found "
                        f"{int(labels.min())}..{int(labels.max())}")
    data = np.ascontiguousarray(x.transpose(3, 0, 1, 2))  # N x H x W x 3
    return ArrayImages(data, (labels % 10).tolist(), [str(d) for d in range(10)])


def _read_stl10(root: Path, train: bool) -> ArrayImages:
    """torchvision's STL-10 ``root/stl10_binary/{train,test}_{X,y}.bin``: uint8 96x96x3 images
    stored column-major per channel (as torchvision reads them), labels 1..10."""
    split = "train" if train else "test"
    folder = next((f for f in (root / "stl10_binary", root) if (f / f"{split}_X.bin").is_file()),
                  root / "stl10_binary")
    x_path, y_path = folder / f"{split}_X.bin", folder / f"{split}_y.bin"
    missing = [p.name for p in (x_path, y_path) if not p.is_file()]
    if missing:
        raise DataError(f"data.root: {folder} holds no {', '.join(missing)} (STL-10 in torchvision's format: "
                        f"{root}/stl10_binary/{{train,test}}_{{X,y}}.bin); point data.root at the folder that "
                        "holds stl10_binary/")
    per_image = 3 * STL10_SIDE * STL10_SIDE
    size, n_labels = x_path.stat().st_size, y_path.stat().st_size
    if size == 0 or size % per_image or size // per_image != n_labels:
        raise DataError(f"data.root: {x_path} holds {size} bytes ({size / per_image:g} images of 96x96x3) and "
                        f"{y_path} {n_labels} labels: expected a whole number of images, one label each; replace "
                        "them with complete copies")
    from slimcore_pipeline.resources import check_memory

    check_memory(2 * size, f"data.root: {x_path} ({n_labels} images of 96x96x3)", "use a machine with more memory")
    images = np.fromfile(x_path, dtype=np.uint8).reshape(-1, 3, STL10_SIDE, STL10_SIDE)
    data = np.ascontiguousarray(images.transpose(0, 3, 2, 1))  # (N, C, W, H) column-major -> N x H x W x C
    labels = np.fromfile(y_path, dtype=np.uint8).astype(np.int64)
    if labels.min() < 1 or labels.max() > 10:
        raise DataError(f"data.root: {y_path}: labels must be in 1..10, found {int(labels.min())}..{int(labels.max())}")
    names_file = folder / "class_names.txt"
    names = names_file.read_text().split() if names_file.is_file() else []
    return ArrayImages(data, (labels - 1).tolist(), names if len(names) == 10 else list(STL10_CLASSES))


def _array_splits(cfg: DataConfig, seed: int | None, full: ArrayImages, test: ArrayImages, name: str) -> Splits:
    """Subset (``data.train_per_class``), then validation hold-out, of the format's training split
    ``full``; every split normalised with the per-channel statistics of what is left to train on."""
    labels = np.asarray(full.targets)
    pool, notes = train_subset(labels, cfg.train_per_class)
    fit, held = validation_split(labels[pool], cfg, seed)
    train_pos, val_pos = pool[fit], pool[held]
    stats = channel_stats(full.data, train_pos)
    mean, std = tuple(stats["mean"]), tuple(stats["std"])
    augment, size = cfg.augmentation(), cfg.image_size
    evaluation = image_transforms(augment, size, False, mean, std)
    test.transform = evaluation
    return Splits(_select(full, train_pos, image_transforms(augment, size, True, mean, std)),
                  _select(full, val_pos, evaluation), test, num_classes=len(full.classes), name=name,
                  normalization=stats, notes=notes)


def _disk_arrays(cfg: DataConfig, seed: int | None = None) -> Splits:
    """An in-memory format other than CIFAR: the MNIST family, SVHN, STL-10."""
    root = Path(cfg.root)
    if cfg.name in _IDX_FAMILY:
        folder = _idx_folder(root, cfg.name)
        full, test = _read_idx_split(folder, cfg.name, True), _read_idx_split(folder, cfg.name, False)
    elif cfg.name == "svhn":
        full, test = _read_svhn(root, True), _read_svhn(root, False)
    else:
        full, test = _read_stl10(root, True), _read_stl10(root, False)
    return _array_splits(cfg, seed, full, test, cfg.name)


def _cifar(cfg: DataConfig, seed: int | None = None) -> Splits:
    """CIFAR-10/100 in torchvision's on-disk format under ``root`` (downloads only if asked);
    ``val`` is held out of the training batches."""
    root = Path(cfg.root)
    if cfg.download:
        from torchvision import datasets

        cls = datasets.CIFAR10 if cfg.name == "cifar10" else datasets.CIFAR100
        cls(str(root), train=True, download=True)  # torchvision verifies the official checksums
    return _array_splits(cfg, seed, CifarFolder(root, cfg.name, True), CifarFolder(root, cfg.name, False), cfg.name)


def _imagefolder(cfg: DataConfig, seed: int | None = None) -> Splits:
    """``root/train/<class>/*`` and ``root/val/<class>/*`` image folders: ``root/val`` is the test
    split; the validation split is held out of ``root/train`` (of its subset, with
    ``data.train_per_class``).  Normalised with ImageNet's statistics: measuring the folder's own
    would decode every image once more, and models for such data usually start from ImageNet
    weights, which expect them."""
    from slimcore_pipeline.imagescan import CheckedImageFolder

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
    labels = np.asarray(full.targets)
    pool, notes = train_subset(labels, cfg.train_per_class)
    fit, held = validation_split(labels[pool], cfg, seed)
    evaluation = image_transforms(cfg.augmentation(), cfg.image_size, False, IMAGENET_MEAN, IMAGENET_STD)
    return Splits(_select(full, pool[fit], full.transform), _select(full, pool[held], evaluation), parts["val"],
                  num_classes=len(full.classes), name="imagefolder",
                  normalization={"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}, notes=notes)


def load_splits(cfg: DataConfig, seed: int | None = None) -> Splits:
    """The train, validation and test splits of the configured dataset.

    ``seed`` draws the validation split; by default ``cfg.split_seed``, which is ``params.seed``
    for the ``data`` section of validated params, so that every stage holds out the same images.
    """
    if cfg.name == "digits":
        return _digits(cfg, seed)
    if cfg.name in ("cifar10", "cifar100"):
        return _cifar(cfg, seed)
    if cfg.name == "imagefolder":
        return _imagefolder(cfg, seed)
    return _disk_arrays(cfg, seed)


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


__all__ = ["ArrayImages", "AugmentedTensors", "CifarFolder", "DataError", "Splits", "channel_stats",
           "check_num_classes", "image_transforms", "load_splits", "make_loader", "read_idx", "stratified_split",
           "train_subset", "validation_split"]
