"""Datasets read from disk without downloading: the MNIST family (idx), SVHN (.mat), STL-10 (.bin);
normalisation measured on the training part; data.train_per_class; what training evaluates."""

from __future__ import annotations

import gzip
import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from slimcore_pipeline.config import DataConfig, ParamsError, TrainConfig, parse_params
from slimcore_pipeline.data import DataError, channel_stats, load_splits, read_idx, train_subset

CLASSES = 10
FASHION = Path("/usr/share/datasets/fashion-mnist")


# --------------------------------------------------------------------------------------------
# writers of tiny files in each format
# --------------------------------------------------------------------------------------------


def _write_idx(path: Path, array: np.ndarray, gz: bool = False, dims: tuple[int, ...] | None = None) -> Path:
    """``array`` (uint8) as an idx file; ``dims`` overrides the sizes the header claims."""
    dims = array.shape if dims is None else dims
    raw = bytes([0, 0, 0x08, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(raw))
    else:
        path.write_bytes(raw)
    return path


def _mnist_arrays(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, 28, 28), dtype=np.uint8), np.arange(n, dtype=np.uint8) % CLASSES


def _write_mnist(folder: Path, gz: bool, n_train: int = 40, n_test: int = 20) -> dict[str, np.ndarray]:
    """The four idx files in ``folder``; returns what they hold."""
    (x_train, y_train), (x_test, y_test) = _mnist_arrays(n_train, 1), _mnist_arrays(n_test, 2)
    for stem, array in (("train-images-idx3-ubyte", x_train), ("train-labels-idx1-ubyte", y_train),
                        ("t10k-images-idx3-ubyte", x_test), ("t10k-labels-idx1-ubyte", y_test)):
        _write_idx(folder / stem, array, gz)
    return {"x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test}


def _write_svhn(root: Path, n_train: int = 30, n_test: int = 12) -> dict[str, np.ndarray]:
    import scipy.io

    out = {}
    for split, n, seed in (("train", n_train, 3), ("test", n_test, 4)):
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
        digits = np.arange(n) % 10
        labels = np.where(digits == 0, 10, digits).astype(np.uint8).reshape(-1, 1)  # SVHN: the digit 0 is 10
        root.mkdir(parents=True, exist_ok=True)
        scipy.io.savemat(str(root / f"{split}_32x32.mat"), {"X": images.transpose(1, 2, 3, 0), "y": labels})
        out[split], out[f"{split}_labels"] = images, digits
    return out


def _write_stl10(root: Path, n_train: int = 20, n_test: int = 10) -> dict[str, np.ndarray]:
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    out = {}
    for split, n, seed in (("train", n_train, 5), ("test", n_test, 6)):
        rng = np.random.default_rng(seed)
        images = rng.integers(0, 256, (n, 96, 96, 3), dtype=np.uint8)  # H x W x C
        # on disk: per image, per channel, column-major (as torchvision reads it)
        (folder / f"{split}_X.bin").write_bytes(np.ascontiguousarray(images.transpose(0, 3, 2, 1)).tobytes())
        (folder / f"{split}_y.bin").write_bytes((np.arange(n) % 10 + 1).astype(np.uint8).tobytes())
        out[split], out[f"{split}_labels"] = images, np.arange(n) % 10
    (root / "stl10_binary" / "unlabeled_X.bin").write_bytes(b"")  # never read
    return out


def _check_normalization(splits) -> None:  # type: ignore[no-untyped-def]
    """The recorded statistics are those of the training part's pixels (after subset and hold-out)."""
    pixels = splits.train.data.astype(np.float64) / 255
    if pixels.ndim == 3:
        pixels = pixels[..., None].repeat(3, axis=3)
    mean, std = pixels.mean(axis=(0, 1, 2)), pixels.std(axis=(0, 1, 2))
    assert splits.normalization["mean"] == pytest.approx(mean.tolist(), abs=2e-6)
    assert splits.normalization["std"] == pytest.approx(std.tolist(), abs=2e-6)
    # and what the images are normalised with: an evaluation image at the native size, undone
    image, _ = splits.val[0] if len(splits.val) else splits.test[0]
    assert image.shape[0] == 3


# --------------------------------------------------------------------------------------------
# the MNIST family
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gz", [False, True], ids=["plain", "gz"])
@pytest.mark.parametrize("layout", ["flat", "torchvision"])
@pytest.mark.parametrize("name,cls", [("mnist", "MNIST"), ("fashionmnist", "FashionMNIST"), ("kmnist", "KMNIST")])
def test_mnist_family_reads_both_layouts(tmp_path: Path, name: str, cls: str, layout: str, gz: bool) -> None:
    folder = tmp_path if layout == "flat" else tmp_path / cls / "raw"
    arrays = _write_mnist(folder, gz)
    splits = load_splits(DataConfig(name=name, root=str(tmp_path), image_size=28, val_fraction=0.25))
    assert (splits.name, splits.num_classes) == (name, 10)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (30, 10, 20)  # 4 per class, 1 held out
    assert np.array_equal(splits.test.data, arrays["x_test"]) and splits.test.targets == arrays["y_test"].tolist()
    image, label = splits.test[3]
    assert image.shape == (3, 28, 28) and label == 3
    assert torch.equal(image[0], image[1]) and torch.equal(image[0], image[2])  # grayscale: 3 equal channels
    mean, std = splits.normalization["mean"][0], splits.normalization["std"][0]
    expected = (torch.from_numpy(arrays["x_test"][3]).float() / 255 - mean) / std
    assert torch.allclose(image[0], expected, atol=1e-5)  # the evaluation transform at the native size
    train_rows = {row.tobytes() for row in splits.train.data} | {row.tobytes() for row in splits.val.data}
    assert train_rows == {row.tobytes() for row in arrays["x_train"]}
    _check_normalization(splits)
    assert len(splits.train.classes) == 10


def test_mnist_family_names_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data\.root: .* holds no Fashion-MNIST idx files \(expected "
                                        r"train-images-idx3-ubyte.*point data\.root at the folder that holds them"):
        load_splits(DataConfig(name="fashionmnist", root=str(tmp_path)))
    _write_mnist(tmp_path, gz=True)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DataError, match=r"holds only part of MNIST: missing t10k-labels-idx1-ubyte\[\.gz\]"):
        load_splits(DataConfig(name="mnist", root=str(tmp_path)))


def test_idx_header_claiming_a_billion_images_is_refused_before_allocating(tmp_path: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import slimcore_pipeline.resources

    def no_allocation(need: int, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"asked for {need} bytes")

    monkeypatch.setattr(slimcore_pipeline.resources, "check_memory", no_allocation)  # refused before the memory check
    images, _ = _mnist_arrays(3, 0)
    for gz in (False, True):
        path = _write_idx(tmp_path / f"big{gz}" / "train-images-idx3-ubyte", images, gz, dims=(10**9, 28, 28))
        with pytest.raises(DataError, match=r"header says 1000000000x28x28 values but the file holds \d+ "):
            read_idx(path, 3)


@pytest.mark.parametrize("case", ["magic", "ndim", "dtype", "short header", "truncated", "overlong", "bad gzip"])
def test_malformed_idx_files_are_refused(tmp_path: Path, case: str) -> None:
    images, _ = _mnist_arrays(4, 0)
    path = _write_idx(tmp_path / "x-idx3-ubyte", images)
    raw = path.read_bytes()
    if case == "magic":
        path.write_bytes(b"\x12\x34" + raw[2:])
    elif case == "ndim":
        path.write_bytes(raw[:3] + b"\x02" + raw[4:])
    elif case == "dtype":
        path.write_bytes(raw[:2] + b"\x0d" + raw[3:])
    elif case == "short header":
        path.write_bytes(raw[:9])
    elif case == "truncated":
        path.write_bytes(raw[:-5])
    elif case == "overlong":
        path.write_bytes(raw + b"\0")
    else:
        path = tmp_path / "x-idx3-ubyte.gz"
        path.write_bytes(gzip.compress(raw)[:-30])
    with pytest.raises(DataError, match=r"^data\.root: .*x-idx3-ubyte"):
        read_idx(path, 3)
    if case in ("truncated", "overlong"):  # a gzipped copy is refused too (its size is only known once read)
        gz = tmp_path / "y-idx3-ubyte.gz"
        gz.write_bytes(gzip.compress(path.read_bytes()))
        with pytest.raises(DataError, match=r"fewer values|more values"):
            read_idx(gz, 3)


def test_mnist_images_and_labels_must_agree(tmp_path: Path) -> None:
    _write_mnist(tmp_path, gz=False)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(7, np.uint8))
    with pytest.raises(DataError, match=r"holds 20 images of 28x28 px and .* 7 labels"):
        load_splits(DataConfig(name="mnist", root=str(tmp_path)))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.full(20, 12, np.uint8))
    with pytest.raises(DataError, match=r"labels must be in \[0, 10\), found 12"):
        load_splits(DataConfig(name="mnist", root=str(tmp_path)))


@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_debians_fashion_mnist_loads_as_installed() -> None:
    splits = load_splits(DataConfig(name="fashionmnist", root=str(FASHION), image_size=28))
    assert len(splits.train) + len(splits.val) == 60000 and len(splits.test) == 10000
    assert len(splits.val) == 6000 and splits.num_classes == 10
    assert np.bincount(splits.test.targets).tolist() == [1000] * 10
    assert splits.train.classes[0] == "T-shirt/top"
    assert splits.normalization["mean"] == pytest.approx([0.2859] * 3, abs=5e-4)  # the well-known 0.2860/0.3530
    assert splits.normalization["std"] == pytest.approx([0.3530] * 3, abs=5e-4)
    image, _ = splits.train[0]
    assert image.shape == (3, 28, 28)


# --------------------------------------------------------------------------------------------
# SVHN and STL-10
# --------------------------------------------------------------------------------------------


def test_svhn_mat_files(tmp_path: Path) -> None:
    arrays = _write_svhn(tmp_path)
    splits = load_splits(DataConfig(name="svhn", root=str(tmp_path), image_size=32, val_fraction=0.34))
    assert (splits.name, splits.num_classes) == ("svhn", 10)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (20, 10, 12)
    assert np.array_equal(splits.test.data, arrays["test"])
    assert splits.test.targets == arrays["test_labels"].tolist()  # 10 read as the digit 0
    assert 0 in splits.train.targets and 10 not in splits.train.targets
    image, label = splits.test[5]
    assert image.shape == (3, 32, 32) and label == 5
    _check_normalization(splits)
    assert DataConfig(name="svhn").augmentation() == "none"  # glyphs: never flipped


def test_svhn_refuses_missing_and_malformed_files(tmp_path: Path) -> None:
    import scipy.io

    with pytest.raises(DataError, match=r"holds no train_32x32\.mat \(SVHN in torchvision's format"):
        load_splits(DataConfig(name="svhn", root=str(tmp_path)))
    _write_svhn(tmp_path)
    scipy.io.savemat(str(tmp_path / "test_32x32.mat"), {"X": np.zeros((32, 32, 3, 4), np.uint8),
                                                       "y": np.ones((3, 1), np.uint8)})
    with pytest.raises(DataError, match=r"test_32x32\.mat: expected X .* and y \(N labels\)"):
        load_splits(DataConfig(name="svhn", root=str(tmp_path)))
    (tmp_path / "test_32x32.mat").write_bytes(b"not a mat file at all" * 10)
    with pytest.raises(DataError, match=r"test_32x32\.mat: not a readable MATLAB v5 file"):
        load_splits(DataConfig(name="svhn", root=str(tmp_path)))


def test_stl10_binary_files(tmp_path: Path) -> None:
    arrays = _write_stl10(tmp_path)
    splits = load_splits(DataConfig(name="stl10", root=str(tmp_path), image_size=96, val_fraction=0.5))
    assert (splits.name, splits.num_classes) == ("stl10", 10)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (10, 10, 10)
    assert np.array_equal(splits.test.data, arrays["test"])  # column-major on disk, H x W x C in memory
    assert splits.test.targets == arrays["test_labels"].tolist()  # 1..10 read as 0..9
    image, label = splits.test[4]
    assert image.shape == (3, 96, 96) and label == 4
    assert splits.train.classes[0] == "airplane"
    _check_normalization(splits)
    assert DataConfig(name="stl10", image_size=96).augmentation() == "crop+flip"


def test_stl10_refuses_partial_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"holds no train_X\.bin, train_y\.bin \(STL-10 in torchvision's format"):
        load_splits(DataConfig(name="stl10", root=str(tmp_path)))
    _write_stl10(tmp_path)
    x = tmp_path / "stl10_binary" / "test_X.bin"
    x.write_bytes(x.read_bytes()[:-100])
    with pytest.raises(DataError, match=r"test_X\.bin holds \d+ bytes .* expected a whole number of images"):
        load_splits(DataConfig(name="stl10", root=str(tmp_path)))


# --------------------------------------------------------------------------------------------
# normalisation statistics and the stratified subset
# --------------------------------------------------------------------------------------------


def test_channel_stats_are_exact_and_grey_repeats_over_three_channels() -> None:
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (50, 5, 6, 3), dtype=np.uint8)
    picked = np.array([1, 4, 9, 30])
    stats = channel_stats(rgb, picked, chunk=3)
    values = rgb[picked].astype(np.float64) / 255
    assert stats["mean"] == pytest.approx(values.mean(axis=(0, 1, 2)).tolist(), abs=1e-6)
    assert stats["std"] == pytest.approx(values.std(axis=(0, 1, 2)).tolist(), abs=1e-6)
    grey = channel_stats(rgb[..., 0], picked)
    assert grey["mean"] == [stats["mean"][0]] * 3 and grey["std"] == [stats["std"][0]] * 3
    flat = channel_stats(np.full((4, 2, 2), 7, np.uint8), np.arange(4))
    assert flat["std"] == [1.0] * 3  # a constant channel keeps its scale


def test_train_subset_is_stratified_and_fixed() -> None:
    labels = np.array([0] * 10 + [1] * 3 + [2] * 6)
    keep, notes = train_subset(labels, 4)
    assert np.bincount(labels[keep]).tolist() == [4, 3, 4]
    assert list(keep) == sorted(keep)
    assert np.array_equal(train_subset(labels, 4)[0], keep)
    assert notes and "data.train_per_class: 4" in notes[0] and "1 (3)" in notes[0]
    everything, none = train_subset(labels, 0)
    assert np.array_equal(everything, np.arange(len(labels))) and none == []


def test_train_per_class_subsets_before_the_validation_split(tmp_path: Path) -> None:
    _write_mnist(tmp_path, gz=False, n_train=80)  # 8 per class
    full = load_splits(DataConfig(name="mnist", root=str(tmp_path), val_fraction=0.25))
    part = load_splits(DataConfig(name="mnist", root=str(tmp_path), val_fraction=0.25, train_per_class=4))
    # 4 per class kept, then a quarter of those (1) held out: 3 per class left to train on
    assert np.bincount(part.train.targets).tolist() == [3] * 10
    assert np.bincount(part.val.targets).tolist() == [1] * 10
    assert len(part.test) == len(full.test) == 20  # the test split is never subset
    assert {r.tobytes() for r in part.train.data} <= {r.tobytes() for r in full.train.data} | \
        {r.tobytes() for r in full.val.data}
    _check_normalization(part)
    assert part.normalization != full.normalization and part.notes == []
    again = load_splits(DataConfig(name="mnist", root=str(tmp_path), val_fraction=0.25, train_per_class=4), seed=5)
    assert {r.tobytes() for r in again.train.data} | {r.tobytes() for r in again.val.data} == \
        {r.tobytes() for r in part.train.data} | {r.tobytes() for r in part.val.data}  # the subset ignores the seed
    many = load_splits(DataConfig(name="mnist", root=str(tmp_path), train_per_class=100))
    assert len(many.train) + len(many.val) == 80 and "keep all of them" in many.notes[0]


def test_train_per_class_on_digits_and_its_validation() -> None:
    plain = load_splits(DataConfig(name="digits"))
    mean, std = plain.normalization["mean"], plain.normalization["std"]
    assert len(set(mean)) == len(set(std)) == 1 and 0 < mean[0] < 1 and 0 < std[0] < 1  # grey, on value/16
    small = load_splits(DataConfig(name="digits", train_per_class=20, val_fraction=0.1))
    assert torch.bincount(small.train.tensors[1]).tolist() == [18] * 10
    assert torch.bincount(small.val.tensors[1]).tolist() == [2] * 10
    assert torch.equal(small.test.tensors[1], plain.test.tensors[1])
    with pytest.raises(ParamsError, match=r"data\.train_per_class: .*greater than or equal to 0"):
        parse_params({"data": {"train_per_class": -1}})


# --------------------------------------------------------------------------------------------
# what training evaluates: the validation split, the test split only with eval_test
# --------------------------------------------------------------------------------------------


def _fit(tmp_path: Path, eval_test: bool, with_val: bool = True):  # type: ignore[no-untyped-def]
    from torch.utils.data import TensorDataset

    from slimcore.models import build_model
    from slimcore_pipeline.config import RuntimeConfig
    from slimcore_pipeline.data import make_loader
    from slimcore_pipeline.runtime import current_context
    from slimcore_pipeline.train import Trainer

    torch.manual_seed(0)
    runtime = RuntimeConfig(device="cpu")
    g = torch.Generator().manual_seed(0)

    def data(n: int) -> TensorDataset:
        y = torch.arange(n) % 4
        return TensorDataset(torch.randn(n, 3, 8, 8, generator=g) + y.view(-1, 1, 1, 1).float(), y)

    cfg = TrainConfig(epochs=2, batch_size=16, warmup_epochs=0, milestones=[], eval_test=eval_test)
    loader = make_loader(data(32), 16, train=True, seed=0, runtime=runtime)
    val = make_loader(data(8), 32, train=False, seed=0, runtime=runtime) if with_val else None
    test = make_loader(data(12), 32, train=False, seed=0, runtime=runtime) if eval_test else None
    trainer = Trainer(build_model("vgg16_bn", 4, "cifar", 0.0625), cfg, current_context(runtime), loader, val,
                      desc="t", test_loader=test)
    history = trainer.fit(curves_dir=tmp_path / "curves")
    metrics = json.loads((tmp_path / "curves" / "metrics.json").read_text())
    return history, metrics


def test_training_evaluates_validation_by_default(tmp_path: Path) -> None:
    history, metrics = _fit(tmp_path, eval_test=False)
    assert all(0 <= h.val_top1 <= 1 and math.isnan(h.test_top1) for h in history)
    assert "top1" in metrics["val"] and "test" not in metrics
    assert TrainConfig().eval_test is False and parse_params({}).finetune.eval_test is False


def test_eval_test_adds_the_test_split(tmp_path: Path) -> None:
    history, metrics = _fit(tmp_path, eval_test=True)
    assert all(0 <= h.val_top1 <= 1 and 0 <= h.test_top1 <= 1 for h in history)
    assert "top1" in metrics["val"] and "top1" in metrics["test"]
    from slimcore_pipeline import plotdata

    rows = plotdata.curve_rows("a", {"baseline-train": [vars(h) for h in history]})
    assert {r["metric"] for r in rows} == {*plotdata.CURVE_METRICS, plotdata.TEST_CURVE_METRIC}
    no_test = plotdata.curve_rows("a", {"baseline-train": [{**vars(h), "test_top1": math.nan} for h in history]})
    assert {r["metric"] for r in no_test} == set(plotdata.CURVE_METRICS)


def test_no_validation_images_no_per_epoch_evaluation(tmp_path: Path) -> None:
    history, metrics = _fit(tmp_path, eval_test=False, with_val=False)
    assert all(math.isnan(h.val_top1) and math.isnan(h.test_top1) for h in history)
    assert "val" not in metrics and "test" not in metrics


def test_the_stage_log_line_names_the_statistics_and_what_is_evaluated() -> None:
    from stages._training import data_summary

    splits = load_splits(DataConfig(name="digits", train_per_class=5))
    line = data_summary(splits, eval_test=False, section="train")
    assert line.startswith("data digits: 40 train, 10 val, ")
    assert "each epoch evaluates val;" in line and f"mean {splits.normalization['mean']}" in line
    assert "evaluates val + test" in data_summary(splits, eval_test=True, section="train")
