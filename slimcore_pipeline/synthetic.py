"""Synthetic CIFAR folders in torchvision's on-disk format (python pickles), for tests and smoke runs.

:func:`write_cifar` lays out the same files that :class:`slimcore_pipeline.data.CifarFolder` reads
(``cifar-10-batches-py/`` or ``cifar-100-python/``) with random uint8 32x32x3 images, so the real
data path -- unpickling, transforms, DataLoader workers -- runs without the real dataset.
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path

import numpy as np

from slimcore_pipeline.data import _CIFAR_LAYOUT

CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
NUM_CLASSES = {"cifar10": 10, "cifar100": 100}

Dump = Callable[[Path, object], None]
LabelRule = Callable[[int, int], int]
"""``rule(file, row)``: the label of row ``row`` of train file ``file`` (1, 2, ...; 0 is the test file)."""


def random_images(n: int, seed: int) -> np.ndarray:
    """``n`` random CIFAR rows: uint8, 3072 values each (1024 red, 1024 green, 1024 blue)."""
    return np.random.default_rng(seed).integers(0, 256, size=(n, 3072), dtype=np.uint8)


def dump_pickle(path: Path, obj: object) -> None:
    """Pickle ``obj`` to ``path`` (as torchvision's own tests build fake CIFAR folders)."""
    with path.open("wb") as fh:
        pickle.dump(obj, fh)


def _split(total: int, parts: int) -> list[int]:
    """``total`` rows over ``parts`` files, as evenly as possible (earlier files get the extra)."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def write_cifar(root: Path, name: str = "cifar100", train_images: int = 500, test_images: int = 100, *,
                labels: LabelRule | None = None, dump: Dump = dump_pickle) -> Path:
    """Write a synthetic ``name`` (cifar10 | cifar100) under ``root``; return its folder.

    Train rows are spread over the layout's train files (CIFAR-10: ``data_batch_1..5``); file k
    holds ``random_images(n, seed=k)`` and the test file ``random_images(n, seed=0)``.  Labels
    come from ``labels(file, row)``; by default row j is class ``j % classes``, so every class
    appears once the split has at least as many images as classes.  ``dump`` writes each pickle
    (e.g. a Python 2 style pickler, as the official files were written).
    """
    folder_name, train_files, test_files, meta_file, names_key, labels_key = _CIFAR_LAYOUT[name]
    classes = NUM_CLASSES[name]
    rule = labels or (lambda _file, row: row % classes)
    folder = root / folder_name
    folder.mkdir(parents=True)
    files = [(f, k, n) for k, (f, n) in enumerate(zip(train_files, _split(train_images, len(train_files))), 1)]
    files += [(f, 0, n) for f, n in zip(test_files, _split(test_images, len(test_files)))]
    for file, index, n in files:
        fine = [rule(index, j) for j in range(n)]
        batch: dict[str, object] = {"data": random_images(n, seed=index), labels_key: fine}
        if name == "cifar100":
            batch["coarse_labels"] = [j % 20 for j in fine]
        dump(folder / file, batch)
    if name == "cifar100":
        meta: dict[str, object] = {names_key: [f"class{i}" for i in range(classes)],
                                   "coarse_label_names": [f"super{i}" for i in range(20)]}
    else:
        meta = {names_key: list(CIFAR10_NAMES), "num_cases_per_batch": _split(train_images, 5)[0], "num_vis": 3072}
    dump(folder / meta_file, meta)
    return folder


__all__ = ["CIFAR10_NAMES", "dump_pickle", "random_images", "write_cifar"]
