"""Datasets and loaders: embedded digits, CIFAR's on-disk pickles, image folders, DataLoader order."""

from __future__ import annotations

import pickle
import re
import struct
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import TensorDataset

from slimcore.errors import SlimcoreError
from slimcore_pipeline.config import DataConfig, RuntimeConfig
from slimcore_pipeline.data import (
    CIFAR_MEAN,
    CIFAR_STD,
    DataError,
    Splits,
    check_num_classes,
    load_splits,
    make_loader,
    stratified_split,
)
from slimcore_pipeline.synthetic import Dump, write_cifar
from slimcore_pipeline.synthetic import dump_pickle as _dump
from slimcore_pipeline.synthetic import random_images as _images

DIGITS_TOTAL = 1797


# --------------------------------------------------------------------------------------------
# digits
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits16() -> Splits:
    return load_splits(DataConfig(name="digits", image_size=16, test_fraction=0.2))


def test_digits_sizes_and_classes(digits16: Splits) -> None:
    x_train, y_train = digits16.train.tensors
    x_test, y_test = digits16.test.tensors
    assert digits16.name == "digits"
    assert digits16.num_classes == 10
    assert len(digits16.train) + len(digits16.val) + len(digits16.test) == DIGITS_TOTAL
    assert len(digits16.test) == pytest.approx(0.2 * DIGITS_TOTAL, abs=10)
    assert len(digits16.val) == pytest.approx(0.1 * 0.8 * DIGITS_TOTAL, abs=10)  # of the training split
    assert x_train.shape == (len(digits16.train), 3, 16, 16)
    assert x_test.shape == (len(digits16.test), 3, 16, 16)
    assert x_train.dtype == torch.float32
    assert y_train.dtype == torch.int64
    assert set(y_train.tolist()) == set(range(10))
    assert set(y_test.tolist()) == set(range(10))


def test_digits_split_is_stratified(digits16: Splits) -> None:
    train_counts = torch.bincount(digits16.train.tensors[1], minlength=10) + \
        torch.bincount(digits16.val.tensors[1], minlength=10)
    test_counts = torch.bincount(digits16.test.tensors[1], minlength=10)
    for n_train, n_test in zip(train_counts.tolist(), test_counts.tolist()):
        assert n_test == max(1, round((n_train + n_test) * 0.2))


def test_digits_are_deterministic_and_the_split_ignores_image_size(digits16: Splits) -> None:
    again = load_splits(DataConfig(name="digits", image_size=16))
    assert torch.equal(again.train.tensors[0], digits16.train.tensors[0])
    assert torch.equal(again.test.tensors[1], digits16.test.tensors[1])
    small = load_splits(DataConfig(name="digits", image_size=8))
    assert torch.equal(small.train.tensors[1], digits16.train.tensors[1])
    assert torch.equal(small.test.tensors[1], digits16.test.tensors[1])
    fewer = load_splits(DataConfig(name="digits", image_size=8, test_fraction=0.5))
    assert len(fewer.test) == pytest.approx(DIGITS_TOTAL / 2, abs=10)


def test_digits_values_are_normalised_on_the_train_split(digits16: Splits) -> None:
    x_train, x_test = digits16.train.tensors[0], digits16.test.tensors[0]
    assert torch.isfinite(x_train).all() and torch.isfinite(x_test).all()
    assert float(x_train.mean()) == pytest.approx(0.0, abs=1e-4)
    assert float(x_train.std()) == pytest.approx(1.0, abs=1e-3)
    assert abs(float(x_test.mean())) < 0.2  # same statistics, not re-fitted on the test split
    # grey images as three identical channels
    assert torch.equal(x_train[:, 0], x_train[:, 1]) and torch.equal(x_train[:, 0], x_train[:, 2])
    # the images are not constant: real digit strokes
    assert float(x_train[0].max() - x_train[0].min()) > 1.0


def test_digits_upsampling_keeps_the_image_content(digits16: Splits) -> None:
    """The 16px images, pooled back to 8px, match the 8px ones (same digits, same order)."""
    small = load_splits(DataConfig(name="digits", image_size=8)).train.tensors[0][:, :1]
    pooled = F.avg_pool2d(digits16.train.tensors[0][:, :1], 2)
    a, b = small.flatten(1), pooled.flatten(1)
    a = (a - a.mean(1, keepdim=True)) / (a.std(1, keepdim=True) + 1e-6)
    b = (b - b.mean(1, keepdim=True)) / (b.std(1, keepdim=True) + 1e-6)
    correlation = (a * b).mean(1) * 64 / 63
    assert float(correlation.min()) > 0.8
    assert float(correlation.mean()) > 0.95


def test_stratified_split_properties() -> None:
    labels = np.array([0] * 10 + [1] * 5 + [2] * 1 + [3] * 4)
    train, test = stratified_split(labels, 0.2, seed=0)
    assert len(np.intersect1d(train, test)) == 0
    assert sorted([*train, *test]) == list(range(len(labels)))
    assert list(train) == sorted(train) and list(test) == sorted(test)
    assert np.bincount(labels[test]).tolist() == [2, 1, 1, 1]  # at least one per class
    again_train, again_test = stratified_split(labels, 0.2, seed=0)
    assert np.array_equal(train, again_train) and np.array_equal(test, again_test)
    others = [tuple(stratified_split(labels, 0.2, seed=s)[1]) for s in range(1, 6)]
    assert any(o != tuple(test) for o in others)


# --------------------------------------------------------------------------------------------
# CIFAR on-disk format
# --------------------------------------------------------------------------------------------


def _fake_cifar10(root: Path, per_batch: int = 2, n_test: int = 3, dump: Dump = _dump) -> Path:
    # train batch i (1..5) row j: class (i + j) % 10; test row j: class j
    return write_cifar(root, "cifar10", 5 * per_batch, n_test, labels=lambda i, j: (i + j) % 10 if i else j, dump=dump)


def _fake_cifar100(root: Path, n_train: int = 6, n_test: int = 4) -> Path:
    return write_cifar(root, "cifar100", n_train, n_test, labels=lambda _i, j: (97 + 5 * j) % 100)


def test_cifar10_folder_loads(tmp_path: Path) -> None:
    _fake_cifar10(tmp_path)
    splits = load_splits(DataConfig(name="cifar10", root=str(tmp_path), image_size=16))
    assert (splits.name, splits.num_classes) == ("cifar10", 10)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 4, 3)
    assert splits.train.classes[3] == "cat"
    # batches in order 1..5 hold [1, 2, 2, 3, 3, 4, 4, 5, 5, 6]: one of each pair is held out, the
    # classes with a single image stay in training
    assert sorted(splits.val.targets) == [2, 3, 4, 5]
    assert sorted(splits.train.targets) == [1, 2, 3, 4, 5, 6]
    image, label = splits.test[2]
    assert isinstance(image, torch.Tensor) and image.shape == (3, 16, 16)
    assert label == 2
    image, label = splits.train[0]
    assert image.shape == (3, 16, 16) and label == 1


def test_cifar_rows_become_hwc_images_with_channels_in_order(tmp_path: Path) -> None:
    folder = _fake_cifar10(tmp_path)
    test = pickle.loads((folder / "test_batch").read_bytes())
    row = test["data"][1]
    splits = load_splits(DataConfig(name="cifar10", root=str(tmp_path), image_size=32))
    hwc = splits.test.data[1]
    assert hwc.shape == (32, 32, 3)
    for c in range(3):  # CIFAR rows: 1024 red, then 1024 green, then 1024 blue values
        assert np.array_equal(hwc[:, :, c], row[1024 * c:1024 * (c + 1)].reshape(32, 32))
    # the evaluation transform at the native size: ToTensor + Normalize with the training part's statistics
    image, _ = splits.test[1]
    mean, std = (torch.tensor(splits.normalization[k]).view(3, 1, 1) for k in ("mean", "std"))
    expected = (torch.from_numpy(hwc).permute(2, 0, 1).float() / 255 - mean) / std
    assert torch.allclose(image, expected, atol=1e-5)
    assert torch.equal(splits.test[1][0], image)


def test_cifar_constant_image_resized_keeps_its_colour(tmp_path: Path) -> None:
    folder = _fake_cifar10(tmp_path)
    rgb = (255, 0, 128)
    data = np.concatenate([np.full(1024, v, np.uint8) for v in rgb])[None]
    _dump(folder / "test_batch", {"labels": [7], "data": data})
    splits = load_splits(DataConfig(name="cifar10", root=str(tmp_path), image_size=16))
    image, label = splits.test[0]
    assert label == 7 and image.shape == (3, 16, 16)
    mean, std = splits.normalization["mean"], splits.normalization["std"]
    for c, v in enumerate(rgb):
        assert torch.allclose(image[c], torch.full((16, 16), (v / 255 - mean[c]) / std[c]), atol=1e-4)


def test_cifar100_folder_uses_fine_labels(tmp_path: Path) -> None:
    _fake_cifar100(tmp_path)
    splits = load_splits(DataConfig(name="cifar100", root=str(tmp_path), image_size=8))
    assert (splits.name, splits.num_classes) == ("cifar100", 100)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (6, 0, 4)  # one image per class: none held out
    assert splits.train.targets == [97, 2, 7, 12, 17, 22]
    assert splits.train.classes[:2] == ["class0", "class1"]
    image, label = splits.test[1]
    assert image.shape == (3, 8, 8) and label == 2


class _Python2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Writes pickles the way the official CIFAR files were written (Python 2, protocol 2):
    byte-string keys and buffers, globals under ``numpy.core.multiarray``."""

    dispatch: ClassVar[dict] = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_py2_str(self, obj: bytes | str) -> None:
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    def save_global(self, obj: object, name: str | None = None) -> None:
        module, qualname = obj.__module__, name or obj.__qualname__  # type: ignore[attr-defined]
        if module.startswith("numpy._core"):
            module = module.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{qualname}\n".encode())
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str
    dispatch[type] = save_global
    dispatch[type(len)] = save_global


def _dump_py2(path: Path, obj: object) -> None:
    with path.open("wb") as fh:
        _Python2Pickler(fh, protocol=2).dump(obj)


def test_cifar_reads_python2_pickles_like_the_official_files(tmp_path: Path) -> None:
    folder = _fake_cifar10(tmp_path, dump=_dump_py2)
    assert b"numpy.core.multiarray\n_reconstruct" in (folder / "test_batch").read_bytes()
    assert b"U\x04data" in (folder / "test_batch").read_bytes()  # SHORT_BINSTRING key, as Python 2 wrote it
    splits = load_splits(DataConfig(name="cifar10", root=str(tmp_path), image_size=8))
    assert (len(splits.train) + len(splits.val), len(splits.test), splits.num_classes) == (10, 3, 10)
    row = _images(3, 0)[2]
    assert np.array_equal(splits.test.data[2][:, :, 0], row[:1024].reshape(32, 32))


def test_missing_cifar_root_names_the_folder_and_the_layout(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DataError) as info:
        load_splits(DataConfig(name="cifar10", root=str(root), image_size=16))
    message = str(info.value)
    assert str(root / "cifar-10-batches-py") in message
    assert "missing data_batch_1, data_batch_2, data_batch_3, data_batch_4, data_batch_5, batches.meta" in message
    assert "data.download" in message
    with pytest.raises(DataError, match="cifar-100-python") as info:
        load_splits(DataConfig(name="cifar100", root=str(root), image_size=16))
    assert "missing train, meta" in str(info.value)


def test_one_missing_cifar_file_is_named(tmp_path: Path) -> None:
    folder = _fake_cifar10(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"missing data_batch_3 \(expected torchvision's layout"):
        load_splits(DataConfig(name="cifar10", root=str(tmp_path), image_size=16))


def test_cifar100_layout_is_not_cifar10(tmp_path: Path) -> None:
    _fake_cifar100(tmp_path)
    with pytest.raises(DataError, match="cifar-10-batches-py"):
        load_splits(DataConfig(name="cifar10", root=str(tmp_path), image_size=16))


@pytest.mark.parametrize("content", [
    pytest.param(pickle.dumps({"data": _images(2, 0)}), id="no-labels-key"),
    pytest.param(b"cos\nsystem\n(S'echo pwned'\ntR.", id="foreign-global"),
    pytest.param(pickle.dumps({"labels": [1]})[:10], id="truncated"),
])
def test_unreadable_cifar_files_are_data_errors(tmp_path: Path, content: bytes) -> None:
    folder = _fake_cifar10(tmp_path)
    (folder / "test_batch").write_bytes(content)
    with pytest.raises(DataError, match="unreadable cifar10 file") as info:
        load_splits(DataConfig(name="cifar10", root=str(tmp_path), image_size=16))
    assert str(folder) in str(info.value)


@pytest.mark.parametrize("batch", [
    pytest.param({"labels": [0, 1], "data": np.zeros((2, 3000), np.uint8)}, id="rows-not-3072"),
    pytest.param({"labels": [0, 1, 2], "data": np.zeros((2, 3072), np.uint8)}, id="more-labels-than-rows"),
    pytest.param({"labels": [0, 42], "data": np.zeros((2, 3072), np.uint8)}, id="label-out-of-range"),
])
def test_malformed_cifar_arrays_are_data_errors(tmp_path: Path, batch: dict) -> None:
    folder = _fake_cifar10(tmp_path)
    _dump(folder / "test_batch", batch)
    with pytest.raises(DataError, match=re.escape(str(folder))):
        splits = load_splits(DataConfig(name="cifar10", root=str(tmp_path), image_size=8))
        [splits.test[i] for i in range(len(splits.test))]


def test_foreign_globals_are_refused_not_called(tmp_path: Path) -> None:
    folder = _fake_cifar10(tmp_path)
    marker = tmp_path / "called"
    payload = f"cbuiltins\nopen\n(S'{marker}'\nS'w'\ntR.".encode()
    (folder / "batches.meta").write_bytes(payload)
    with pytest.raises(DataError, match=r"refusing to load builtins\.open"):
        load_splits(DataConfig(name="cifar10", root=str(tmp_path), image_size=16))
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# image folders
# --------------------------------------------------------------------------------------------

COLOURS = {"cat": (200, 30, 30), "dog": (30, 200, 30), "emu": (30, 30, 200)}


def _image_folder(root: Path, splits: dict[str, list[str]], per_class: int = 2) -> Path:
    for split, classes in splits.items():
        for cls in classes:
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (12 + i, 10), COLOURS[cls]).save(folder / f"{i}.png")
    return root


def test_imagefolder_loads_train_and_val(tmp_path: Path) -> None:
    root = _image_folder(tmp_path / "imgs", {"train": ["cat", "dog", "emu"], "val": ["cat", "dog", "emu"]},
                         per_class=2)
    (root / "val" / "emu" / "1.png").unlink()
    splits = load_splits(DataConfig(name="imagefolder", root=str(root), image_size=8))
    assert (splits.name, splits.num_classes) == ("imagefolder", 3)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (3, 3, 5)  # val: 1 of 2 per class
    assert splits.train.classes == splits.val.classes == ["cat", "dog", "emu"]
    image, label = splits.test[4]
    assert image.shape == (3, 8, 8) and label == 2
    assert torch.equal(splits.test[4][0], image)  # evaluation transform: deterministic
    # a blue image stays bluest after resizing and normalising
    assert int(image.mean((1, 2)).argmax()) == 2
    image, label = splits.train[0]
    assert image.shape == (3, 8, 8) and label == 0


def test_missing_imagefolder_root_names_the_expected_layout(tmp_path: Path) -> None:
    root = tmp_path / "absent"
    with pytest.raises(DataError) as info:
        load_splits(DataConfig(name="imagefolder", root=str(root), image_size=8))
    message = str(info.value)
    assert f"{root / 'train'} not found" in message
    assert f"{root}/train/<class>/<image>" in message and f"{root}/val/<class>/<image>" in message


def test_imagefolder_without_val_names_val(tmp_path: Path) -> None:
    root = _image_folder(tmp_path, {"train": ["cat", "dog"]})
    with pytest.raises(DataError, match=re.escape(f"{root / 'val'} not found")):
        load_splits(DataConfig(name="imagefolder", root=str(root), image_size=8))


def test_imagefolder_without_class_folders_is_a_data_error(tmp_path: Path) -> None:
    root = tmp_path / "flat"
    for split in ("train", "val"):
        (root / split).mkdir(parents=True)
        Image.new("RGB", (8, 8)).save(root / split / "0.png")
    with pytest.raises(DataError) as info:
        load_splits(DataConfig(name="imagefolder", root=str(root), image_size=8))
    assert str(root / "train") in str(info.value)


def test_imagefolder_class_mismatch_is_refused(tmp_path: Path) -> None:
    root = _image_folder(tmp_path, {"train": ["cat", "dog"], "val": ["cat", "dog", "emu"]})
    with pytest.raises(DataError) as info:
        load_splits(DataConfig(name="imagefolder", root=str(root), image_size=8))
    message = str(info.value)
    assert "class folders differ" in message
    assert f"{root}/train (2)" in message and f"{root}/val (3)" in message


def test_check_num_classes(digits16: Splits) -> None:
    check_num_classes(digits16, 10, "models/x.pt")
    with pytest.raises(DataError) as info:
        check_num_classes(digits16, 100, "models/x.pt")
    message = str(info.value)
    assert "models/x.pt has 100 classes" in message and "'digits' has 10" in message
    assert issubclass(DataError, SlimcoreError)


# --------------------------------------------------------------------------------------------
# make_loader
# --------------------------------------------------------------------------------------------


def _indexed(n: int = 10) -> TensorDataset:
    return TensorDataset(torch.arange(n).float().view(n, 1, 1, 1).expand(n, 3, 2, 2).contiguous(), torch.arange(n))


def _order(loader) -> list[int]:  # type: ignore[no-untyped-def]
    return [int(i) for _, y in loader for i in y]


def test_eval_loader_keeps_order_and_the_last_batch() -> None:
    loader = make_loader(_indexed(), 4, train=False, seed=0, runtime=RuntimeConfig())
    batches = list(loader)
    assert [len(y) for _, y in batches] == [4, 4, 2]
    assert batches[0][0].shape == (4, 3, 2, 2)
    assert _order(loader) == list(range(10))


def test_train_loader_shuffles_by_seed_and_epoch_and_drops_the_partial_batch() -> None:
    runtime = RuntimeConfig()
    loader = make_loader(_indexed(), 4, train=True, seed=3, runtime=runtime)
    batches = list(loader)
    assert [len(y) for _, y in batches] == [4, 4]
    first = _order(loader)
    assert len(set(first)) == 8 and first != sorted(first)
    assert _order(make_loader(_indexed(), 4, train=True, seed=3, runtime=runtime)) == first
    assert _order(loader) == first  # same epoch, same order
    loader.sampler.set_epoch(1)
    assert _order(loader) != first
    others = [_order(make_loader(_indexed(), 4, train=True, seed=s, runtime=runtime)) for s in (4, 5)]
    assert any(o != first for o in others)


def test_ranks_see_disjoint_shards() -> None:
    runtime = RuntimeConfig()
    shards = [_order(make_loader(_indexed(), 2, train=False, seed=0, runtime=runtime, rank=r, world_size=2))
              for r in (0, 1)]
    assert sorted(shards[0] + shards[1]) == list(range(10))
    assert set(shards[0]).isdisjoint(shards[1])
    train = [_order(make_loader(_indexed(), 2, train=True, seed=0, runtime=runtime, rank=r, world_size=2))
             for r in (0, 1)]
    assert len(train[0]) == len(train[1]) == 4
    assert set(train[0]).isdisjoint(train[1])


def test_loader_runtime_options() -> None:
    plain = make_loader(_indexed(), 4, train=False, seed=0, runtime=RuntimeConfig(pin_memory="auto"))
    assert plain.pin_memory is False and plain.num_workers == 0 and plain.persistent_workers is False
    assert make_loader(_indexed(), 4, train=False, seed=0, runtime=RuntimeConfig(pin_memory="auto"),
                       device="cuda").pin_memory is True
    assert make_loader(_indexed(), 4, train=False, seed=0, runtime=RuntimeConfig(pin_memory="on")).pin_memory is True
    workers = make_loader(_indexed(), 4, train=False, seed=0, runtime=RuntimeConfig(num_workers=2))
    assert workers.num_workers == 2 and workers.persistent_workers is True


def test_digits_through_the_loader(digits16: Splits) -> None:
    loader = make_loader(digits16.train, 64, train=True, seed=0, runtime=RuntimeConfig())
    assert len(loader) == len(digits16.train) // 64
    x, y = next(iter(loader))
    assert x.shape == (64, 3, 16, 16) and y.shape == (64,)
    assert x.dtype == torch.float32 and y.dtype == torch.int64


def test_cifar_copies_written_with_any_pickle_protocol_and_numpy_labels_load(tmp_path: Path) -> None:
    """Users make reduced copies with today's numpy and pickle: protocol 5, numpy-integer labels."""
    import pickle

    folder = _fake_cifar10(tmp_path)
    batch = {"labels": list(np.array([3, 1], dtype=np.int64)), "data": np.full((2, 3072), 7, np.uint8)}
    (folder / "test_batch").write_bytes(pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL))
    splits = load_splits(DataConfig(name="cifar10", root=str(tmp_path), image_size=8))
    assert [splits.test[i][1] for i in range(len(splits.test))] == [3, 1]


# --------------------------------------------------------------------------------------------
# augmentation (data.augment)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "size", "expected"), [
    ("digits", 16, "none"), ("digits", 128, "none"),  # a mirrored digit is another glyph
    ("cifar10", 32, "crop+flip"), ("cifar100", 224, "crop+flip"),  # 32px images, at any size
    ("imagefolder", 16, "crop+flip"), ("imagefolder", 64, "crop+flip"), ("imagefolder", 65, "imagenet"),
    ("imagefolder", 224, "imagenet"),
])
def test_auto_augmentation_suits_the_image_size(name: str, size: int, expected: str) -> None:
    assert DataConfig(name=name, image_size=size).augmentation() == expected
    for explicit in ("none", "flip", "crop+flip", "imagenet"):
        assert DataConfig(name=name, image_size=size, augment=explicit).augmentation() == explicit


def test_unknown_augment_names_the_key() -> None:
    from slimcore_pipeline.config import ParamsError, parse_params

    with pytest.raises(ParamsError, match=r"data\.augment: .*'none', 'flip', 'crop\+flip'.*\(got 'mixup'\)"):
        parse_params({"data": {"augment": "mixup"}})


def _pil(width: int = 12, height: int = 10) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def test_image_transforms_per_mode() -> None:
    from slimcore_pipeline.data import image_transforms

    image = _pil()
    evals = {a: image_transforms(a, 8, False, CIFAR_MEAN, CIFAR_STD)(image) for a in ("none", "flip", "crop+flip")}
    assert all(t.shape == (3, 8, 8) for t in evals.values())  # non-square in, square out
    assert torch.equal(evals["none"], evals["flip"]) and torch.equal(evals["none"], evals["crop+flip"])
    zoomed = image_transforms("imagenet", 8, False, CIFAR_MEAN, CIFAR_STD)(image)
    assert zoomed.shape == (3, 8, 8) and not torch.equal(zoomed, evals["none"])  # 1.14x, center crop
    reference = evals["none"]
    torch.manual_seed(0)
    draws = {a: [image_transforms(a, 8, True, CIFAR_MEAN, CIFAR_STD)(image) for _ in range(16)]
             for a in ("none", "flip", "crop+flip", "imagenet")}
    assert all(torch.equal(t, reference) for t in draws["none"])  # nothing random
    flips = [torch.equal(t, reference.flip(-1)) for t in draws["flip"]]
    assert all(f or torch.equal(t, reference) for f, t in zip(flips, draws["flip"])) and 0 < sum(flips) < 16
    assert all(t.shape == (3, 8, 8) for a in draws for t in draws[a])
    assert sum(not torch.equal(t, reference) and not torch.equal(t, reference.flip(-1))
               for t in draws["crop+flip"]) > 4  # shifted by up to image_size // 8 = 1 pixel
    with pytest.raises(ValueError, match="augment must be one of"):
        image_transforms("auto", 8, True, CIFAR_MEAN, CIFAR_STD)


def test_small_imagefolder_no_longer_trains_with_random_resized_crops(tmp_path: Path) -> None:
    from torchvision import transforms as T

    root = _image_folder(tmp_path / "imgs", {"train": ["cat", "dog"], "val": ["cat", "dog"]})
    kinds = {}
    for size in (16, 96):
        splits = load_splits(DataConfig(name="imagefolder", root=str(root), image_size=size))
        kinds[size] = [type(t) for t in splits.train.transform.transforms]
    assert T.RandomResizedCrop not in kinds[16] and T.RandomCrop in kinds[16]
    assert T.RandomResizedCrop in kinds[96]


def test_digits_augmentation_keeps_the_test_set_and_pads_with_background(digits16: Splits) -> None:
    from slimcore_pipeline.data import AugmentedTensors

    x_test = digits16.test.tensors[0]
    x_train = digits16.train.tensors[0]
    flip = load_splits(DataConfig(name="digits", image_size=16, augment="flip"))
    assert isinstance(flip.train, AugmentedTensors) and torch.equal(flip.test.tensors[0], x_test)
    torch.manual_seed(0)
    seen = [flip.train[0][0] for _ in range(12)]
    assert all(torch.equal(s, x_train[0]) or torch.equal(s, x_train[0].flip(-1)) for s in seen)
    crop = load_splits(DataConfig(name="digits", image_size=16, augment="crop+flip"))
    background = x_train.min()  # raw 0 (no ink), normalised: what the padding is filled with
    torch.manual_seed(1)
    shifted = [crop.train[i][0] for i in range(40)]
    assert all(s.shape == (3, 16, 16) for s in shifted)
    assert any(not torch.equal(s, x_train[i]) and not torch.equal(s, x_train[i].flip(-1))
               for i, s in enumerate(shifted))
    ink = torch.full((3, 16, 16), 5.0)
    padded = [crop.train.transform(ink) for _ in range(20)]
    assert all(bool(((p == 5.0) | torch.isclose(p, background)).all()) for p in padded)
    assert sum(bool(torch.isclose(p, background).any()) for p in padded) > 10  # 2 px of padding shows
    zoom = load_splits(DataConfig(name="digits", image_size=16, augment="imagenet"))
    assert zoom.test.tensors[0].shape == x_test.shape and not torch.equal(zoom.test.tensors[0], x_test)
    assert torch.equal(zoom.test.tensors[1], digits16.test.tensors[1])
    assert zoom.train[0][0].shape == (3, 16, 16)


# --------------------------------------------------------------------------------------------
# the validation split (data.val_fraction): held out of training, never of the test split
# --------------------------------------------------------------------------------------------

VAL_CLASSES, VAL_PER_CLASS = 4, 10


def _tiny_digits(monkeypatch: pytest.MonkeyPatch) -> None:
    """40 distinct 8x8 'digits', 10 per class, in place of scikit-learn's 1,797."""
    n = VAL_CLASSES * VAL_PER_CLASS
    rng = np.random.default_rng(0)
    images = rng.integers(0, 17, size=(n, 8, 8)).astype(np.float32)
    labels = np.arange(n, dtype=np.int64) % VAL_CLASSES
    monkeypatch.setattr("slimcore_pipeline.data._digits_arrays", lambda: (images, labels))


def _tiny_cifar(root: Path) -> None:
    write_cifar(root, "cifar10", VAL_CLASSES * VAL_PER_CLASS, 8, labels=lambda _f, j: j % VAL_CLASSES)


def _tiny_imagefolder(root: Path) -> None:
    rng = np.random.default_rng(1)
    for split, per_class in (("train", VAL_PER_CLASS), ("val", 2)):
        for c in range(VAL_CLASSES):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / f"{i}.png")


def _sample_ids(dataset) -> list[bytes]:  # type: ignore[no-untyped-def]
    """What identifies each sample of a split: its pixels as stored (tensor, CIFAR row, file bytes)."""
    if isinstance(dataset, TensorDataset):
        return [x.numpy().tobytes() for x in dataset.tensors[0]]
    if hasattr(dataset, "data"):  # CifarFolder: uint8 HWC rows
        return [row.tobytes() for row in dataset.data]
    return [Path(path).read_bytes() for path, _ in dataset.samples]


def _labels(dataset) -> list[int]:  # type: ignore[no-untyped-def]
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].tolist()
    return list(dataset.targets)


def _load_tiny(fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seed: int | None = None,
               **cfg: object) -> Splits:
    root = tmp_path / fmt
    if not root.exists():
        {"digits": lambda _r: _tiny_digits(monkeypatch), "cifar10": _tiny_cifar,
         "imagefolder": _tiny_imagefolder}[fmt](root)
    return load_splits(DataConfig(name=fmt, root=str(root), image_size=8, **cfg), seed=seed)


FORMATS = ["digits", "cifar10", "imagefolder"]


@pytest.mark.parametrize("fmt", FORMATS)
def test_val_is_held_out_of_train_and_never_taken_from_test(fmt: str, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    splits = _load_tiny(fmt, tmp_path, monkeypatch, val_fraction=0.2)
    train, val, test = (_sample_ids(d) for d in (splits.train, splits.val, splits.test))
    assert len(set(train)) == len(train) and len(set(val)) == len(val)  # the fixtures' images are distinct
    assert val and not set(val) & set(train)
    assert not set(val) & set(test) and not set(train) & set(test)
    if fmt == "digits":  # the test split is the same 20% as with any val_fraction (normalised with the
        # statistics of train, which do depend on it: compare up to that affine map)
        other = load_splits(DataConfig(name="digits", image_size=8, val_fraction=0.5)).test.tensors[0]
        mine = splits.test.tensors[0]
        assert torch.allclose((mine - mine.mean()) / mine.std(), (other - other.mean()) / other.std(), atol=1e-5)
        assert len(train) + len(val) + len(test) == VAL_CLASSES * VAL_PER_CLASS
        return
    elif fmt == "cifar10":  # every training row is in train or val, the test batch is read whole
        assert len(train) + len(val) == VAL_CLASSES * VAL_PER_CLASS and len(test) == 8
        test_before = [r.tobytes() for r in pickle.loads(
            (tmp_path / fmt / "cifar-10-batches-py" / "test_batch").read_bytes())["data"].reshape(-1, 3, 32, 32)
            .transpose(0, 2, 3, 1)]
    else:  # root/train is split, root/val stays the test split
        assert len(train) + len(val) == VAL_CLASSES * VAL_PER_CLASS
        test_before = [p.read_bytes() for p in sorted((tmp_path / fmt / "val").rglob("*.png"))]
    assert test == test_before


@pytest.mark.parametrize("fmt", FORMATS)
def test_val_is_stratified_and_deterministic(fmt: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    splits = _load_tiny(fmt, tmp_path, monkeypatch, val_fraction=0.3)
    # per class: 10 training images (digits: 10 images, 2 of them in the test split), 30% of them in val
    per_class = VAL_PER_CLASS - (round(0.2 * VAL_PER_CLASS) if fmt == "digits" else 0)
    n_val = round(0.3 * per_class)
    assert np.bincount(_labels(splits.val)).tolist() == [n_val] * VAL_CLASSES
    assert np.bincount(_labels(splits.train)).tolist() == [per_class - n_val] * VAL_CLASSES
    again = _load_tiny(fmt, tmp_path, monkeypatch, val_fraction=0.3)
    assert _sample_ids(again.val) == _sample_ids(splits.val)
    assert _sample_ids(again.train) == _sample_ids(splits.train)
    others = {tuple(_sample_ids(_load_tiny(fmt, tmp_path, monkeypatch, seed=s, val_fraction=0.3).val))
              for s in range(1, 4)}
    assert others - {tuple(_sample_ids(splits.val))}  # another seed, another draw


def test_the_val_split_is_seeded_by_params_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from slimcore_pipeline.config import Params

    _tiny_digits(monkeypatch)
    params = Params(seed=7)
    assert params.data.split_seed == 7 and DataConfig().split_seed == 0
    by_params = load_splits(params.data)
    assert _sample_ids(by_params.val) == _sample_ids(load_splits(DataConfig(), seed=7).val)
    assert _sample_ids(by_params.val) != _sample_ids(load_splits(DataConfig(), seed=0).val)
    seed0 = load_splits(DataConfig(), seed=0).test.tensors
    assert torch.equal(by_params.test.tensors[1], seed0[1])  # the test split does not depend on the seed
    x, y = by_params.test.tensors[0], seed0[0]  # (its normalisation, fitted on train, may shift a little)
    assert torch.allclose((x - x.mean()) / x.std(), (y - y.mean()) / y.std(), atol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
def test_val_is_read_with_the_evaluation_transform(fmt: str, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from torchvision import transforms as T

    from slimcore_pipeline.data import AugmentedTensors

    splits = _load_tiny(fmt, tmp_path, monkeypatch, augment="crop+flip")
    torch.manual_seed(0)
    for i in range(len(splits.val)):
        first, second = splits.val[i][0], splits.val[i][0]
        assert torch.equal(first, second)  # nothing random
    if fmt == "digits":
        assert isinstance(splits.train, AugmentedTensors) and isinstance(splits.val, TensorDataset)
        plain = load_splits(DataConfig(name="digits", image_size=8, augment="none"))
        assert torch.allclose(splits.val.tensors[0], plain.val.tensors[0])
        return
    random_ops = (T.RandomCrop, T.RandomHorizontalFlip, T.RandomResizedCrop)
    assert any(isinstance(t, random_ops) for t in splits.train.transform.transforms)
    assert not any(isinstance(t, random_ops) for t in splits.val.transform.transforms)
    assert [type(t) for t in splits.val.transform.transforms] == [type(t) for t in splits.test.transform.transforms]
    first_val = splits.val[0][0]
    assert first_val.shape == (3, 8, 8)
