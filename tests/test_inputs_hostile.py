"""Inputs that validation accepted but that went silently wrong, hung, or ended in a traceback.

Each now ends in one line naming the file, key or value and what to do (exit 2 and nothing
written for a stage), is bounded before the work, or is read correctly: 16-bit images, hidden
folders, nested YAML aliases, huge params files, a fine sensitivity grid, decompression-bomb
images, crafted CIFAR pickles, lazy layers, BatchNorm variants, the wrong channel count, a
``-0.0`` target and the interrupt message of stages that have no epochs.
"""

from __future__ import annotations

import itertools
import pickle
import struct
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
import yaml
from PIL import Image
from torch import nn

from slimcore.errors import DataError, ModelError, ParamsError
from slimcore.models import build_model
from slimcore.prune import SlimError, slim
from slimcore.targets import parse_target
from slimcore_pipeline.config import MAX_PARAMS_BYTES, DataConfig, load_params, parse_params
from slimcore_pipeline.data import load_splits
from slimcore_pipeline.imagescan import CheckedImageFolder, load_image
from slimcore_pipeline.sensitivity import ratio_grid
from slimcore_pipeline.yamlio import AliasBombError, safe_load_unique
from tests.helpers.nets import bn_variant
from tests.test_inputs import ARCH, _image_tree, _imagefolder_project, _project, _refused

NETS = "tests.helpers.nets"


# ---------------------------------------------------------------- images


def _gray16(path: Path, value: int) -> None:
    Image.fromarray(np.full((8, 8), value, np.uint16)).save(path)
    assert Image.open(path).mode.startswith("I;16")


def test_16_bit_images_are_scaled_from_their_range_not_clipped(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    for c, value in enumerate((1000, 30000)):
        folder = root / "train" / f"c{c}"
        folder.mkdir(parents=True)
        for i in range(2):
            _gray16(folder / f"{i}.png", value)
    dataset = CheckedImageFolder(root / "train")
    pixels = {label: np.asarray(image)[0, 0].tolist() for image, label in (dataset[i] for i in range(len(dataset)))}
    assert pixels == {0: [4, 4, 4], 1: [117, 117, 117]}  # 1000 / 65535 and 30000 / 65535 of 255; not both 255
    # a float image is read when its values are in [0, 1], refused (naming the file) otherwise
    Image.fromarray(np.full((4, 4), 0.5, np.float32)).save(tmp_path / "half.tif")
    assert np.asarray(load_image(str(tmp_path / "half.tif")))[0, 0].tolist() == [128, 128, 128]
    Image.fromarray(np.full((4, 4), 7.5, np.float32)).save(tmp_path / "big.tif")
    with pytest.raises(DataError, match=r"big\.tif: a 32-bit float image with values 7\.5\.\.7\.5, outside 0\.\.1: "
                                        r"save it as an 8- or 16-bit image"):
        load_image(str(tmp_path / "big.tif"))


def test_hidden_folders_and_files_are_neither_classes_nor_images(tmp_path: Path) -> None:
    root = _image_tree(tmp_path / "imgs")
    for where in (root / "train" / ".ipynb_checkpoints", root / "train" / "c0" / ".ipynb_checkpoints"):
        where.mkdir()
        Image.new("RGB", (8, 8)).save(where / "0-checkpoint.png")
    Image.new("RGB", (8, 8)).save(root / "train" / "c1" / "._0.png")  # macOS resource fork
    (root / "train" / "c1" / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    dataset = CheckedImageFolder(root / "train")
    assert dataset.classes == ["c0", "c1"]
    assert len(dataset.samples) == 6 and all("/." not in path for path, _ in dataset.samples)
    splits = load_splits(DataConfig(name="imagefolder", root=str(root), image_size=8))
    assert splits.num_classes == 2  # and train/val agree on the classes


def _png_header(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height`` pixels (a decompression bomb's header), no pixels."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


def test_decompression_bomb_image_is_one_line(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_header(40000, 40000))
    with pytest.raises(DataError, match=r"bomb\.png: Image size \(1600000000 pixels\) exceeds limit .*decompression "
                                        r"bomb DOS attack: replace it with a smaller image or remove it"):
        load_image(str(bomb))
    project = _imagefolder_project(tmp_path)
    for image in sorted((project / "imgs" / "train" / "c1").iterdir()):  # some land in the validation split
        image.write_bytes(_png_header(40000, 40000))
    _refused(project, "baseline_train", "--arch", ARCH,
             expect=("data.root: imgs/train/c1/", "exceeds limit", "decompression bomb", "remove it"))


# ---------------------------------------------------------------- CIFAR pickles


def _fake_cifar10(root: Path) -> Path:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    batch = {"data": np.zeros((2, 3072), np.uint8), "labels": [0, 1]}
    for name in [*(f"data_batch_{i}" for i in range(1, 6)), "test_batch"]:
        (folder / name).write_bytes(pickle.dumps(batch, protocol=4))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a", "b"]}, protocol=4))
    return folder


class _HugeArray:
    """Pickles as numpy's own array constructor asked for a 9 TiB array."""

    def __reduce__(self):  # type: ignore[no-untyped-def]
        from numpy._core.multiarray import _reconstruct

        return _reconstruct, (np.ndarray, (9 * 2 ** 40,), b"b")


def test_crafted_cifar_batch_is_refused_before_allocating(tmp_path: Path) -> None:
    folder = _fake_cifar10(tmp_path)
    (folder / "data_batch_3").write_bytes(pickle.dumps({"data": _HugeArray(), "labels": [0]}, protocol=4))
    with pytest.raises(DataError, match=r"data_batch_3: unreadable cifar10 file \(an array of shape "
                                        r"\(9895604649984,\) would take 9,895,604,649,984 bytes, more than the "
                                        r"file's \d+: a crafted or corrupt file\); replace it"):
        load_splits(DataConfig(name="cifar10", root=str(tmp_path), image_size=8))


# ---------------------------------------------------------------- params.yaml


def _alias_bomb(lines: int = 9) -> str:
    names = "abcdefghijklmnop"[:lines]
    out = ["seed: 0", "models:", "  x:", "    source: python", f"    name: {NETS}:small_cnn", "    kwargs:",
           f"      {names[0]}: &{names[0]} [1, 1, 1, 1, 1, 1, 1, 1, 1]"]
    for prev, name in itertools.pairwise(names):
        out.append(f"      {name}: &{name} [{', '.join([f'*{prev}'] * 9)}]")
    return "\n".join(out) + "\n"


def test_nested_yaml_aliases_are_refused_at_once(tmp_path: Path) -> None:
    started = time.monotonic()
    with pytest.raises(AliasBombError, match=r"models\.x\.kwargs\.f \(line 12\): its YAML aliases \(\*name\) expand "
                                             r"to over 100,000 values"):
        safe_load_unique(_alias_bomb())
    assert time.monotonic() - started < 2  # 9 ** 9 values were never built nor walked
    with pytest.raises(AliasBombError, match=r"a\.b: a YAML alias refers to a mapping or list that contains it"):
        safe_load_unique("a: &x\n  b: *x\n")
    # aliases that stay small keep working, merge keys included
    assert safe_load_unique("t: &t {lr: 0.1, e: 3}\nf: *t\ng:\n  <<: *t\n  e: 4\n") == \
        {"t": {"lr": 0.1, "e": 3}, "f": {"lr": 0.1, "e": 3}, "g": {"lr": 0.1, "e": 4}}
    # a stage refuses it in one line, at once (it hung, and could not be stopped, for minutes)
    project = _project(tmp_path / "p")
    (project / "params.yaml").write_text(_alias_bomb())
    started = time.monotonic()
    _refused(project, "sensitivity", "--arch", ARCH, "--target", "0.2",
             expect=("params.yaml: models.x.kwargs.f (line 12): its YAML aliases", "write the values out"))
    assert time.monotonic() - started < 60


def test_params_file_beyond_the_size_limit_is_refused_unread(tmp_path: Path) -> None:
    file = tmp_path / "params.yaml"
    file.write_text("seed: 0\nnotes:\n" + "".join(f"  k{i}: [{i}, {i + 1}, {i + 2}]\n" for i in range(80000)))
    assert file.stat().st_size > MAX_PARAMS_BYTES
    started = time.monotonic()
    with pytest.raises(ParamsError, match=r"params\.yaml: \d\.\d MB, over the 256 KiB a params file may hold "
                                          r"\(settings take a few KB\): move data out of it"):
        load_params(file)
    assert time.monotonic() - started < 1


def test_sensitivity_step_has_a_floor_and_the_grid_no_duplicates() -> None:
    with pytest.raises(ParamsError, match=r"params\.yaml: prune\.sensitivity_step: must be in \[0\.01, 0\.5\]: the "
                                          r"grid slims and evaluates the model once per ratio, .*\(got 1e-07\)"):
        parse_params({"prune": {"sensitivity_step": 1.0e-07}})
    assert parse_params({"prune": {"sensitivity_step": 0.01}}).prune.sensitivity_step == 0.01
    grid = ratio_grid(0.01)
    assert len(grid) == 99 == len(set(grid)) and grid == sorted(grid) and 0 not in grid
    with pytest.raises(ValueError, match=r"\[0\.01, 0\.5\]"):
        ratio_grid(1e-7)


# ---------------------------------------------------------------- prune targets


def test_negative_zero_target_is_refused(tmp_path: Path) -> None:
    for value in (-0.0, "-0.0"):
        with pytest.raises(ValueError, match=r"-0\.0: negative zero; write it 0\.0"):
            parse_target(value)
    with pytest.raises(ParamsError, match=r"prune\.targets: entry 1: -0\.0: negative zero; write it 0\.0"):
        parse_params({"prune": {"targets": [0.2, -0.0]}})
    assert parse_target(0.0).tag == "0.0"
    _refused(_project(tmp_path / "p"), "prune", "--arch", ARCH, "--target", "-0.0",
             expect=("--target -0.0: -0.0: negative zero; write it 0.0",))


# ---------------------------------------------------------------- models given to slim


X = torch.randn(4, 3, 12, 12, generator=torch.Generator().manual_seed(0))


def test_uninitialised_lazy_layers_are_refused_not_reinitialised() -> None:
    model = nn.Sequential(nn.LazyConv2d(8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 2))
    with pytest.raises(ModelError, match=r"uninitialised lazy parameters \(0\.weight, 0\.bias\): slimming would "
                                         r"trace it with new random weights; run one forward pass"):
        slim(model, 0.25, X)
    model(X)  # initialised: its weights are kept
    weight = model[0].weight.detach().clone()
    pruned, _ = slim(model, 0.25, X)
    kept = pruned[0].weight.shape[0]
    assert kept < 8 and any(torch.equal(pruned[0].weight[0], w) for w in weight)


def test_batchnorm_without_running_stats_slims_and_computes_the_same() -> None:
    model = bn_variant(2, "batch_stats").eval()
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.weight.copy_(torch.tensor([0.0, 1, 0, 1, 0, 1, 0, 1]))
            bn.bias.uniform_(0.1, 0.5)
    pruned, report = slim(model, 0.5, X)  # the zero-gamma channels: their constant folds away exactly
    assert report.removed_bn_channels == 8
    with torch.no_grad():
        assert torch.allclose(pruned(X), model(X), atol=1e-5)


@pytest.mark.parametrize(("kind", "said"), [
    ("affine_free", "has 2 BatchNorm2d layers (1, 4), all with affine=False: no learnable scale (gamma) to rank "
                    "channels by; build them with affine=True"),
    ("sync", "has SyncBatchNorm layers (2: 1, 4) and no BatchNorm2d: slimming ranks BatchNorm2d scale factors; "
             "build it with nn.BatchNorm2d"),
])
def test_batchnorm_variants_are_named_not_called_missing(kind: str, said: str) -> None:
    with pytest.raises(SlimError) as info:
        slim(bn_variant(2, kind), 0.3, X)
    assert said in str(info.value) and "no BatchNorm2d (" not in str(info.value)
    with pytest.raises(ModelError) as built:  # and a pipeline model of that kind is refused when built
        build_model(f"{NETS}:bn_variant", 2, kind=kind)
    assert f"python model '{NETS}:bn_variant' {said}" in str(built.value)


def test_wrong_channel_count_is_one_line() -> None:
    with pytest.raises(ModelError, match=r"the model takes 3-channel input \(its first convolution '0'\) but is "
                                         r"given an example input of shape \(4, 1, 12, 12\): pass example inputs"):
        slim(bn_variant(2), 0.3, X[:, :1])
    with pytest.raises(ModelError, match=rf"python model '{NETS}:bn_variant' takes 1-channel input \(its first "
                                         r"convolution '0'\) but is given 3-channel images .*: build it with 3 input "
                                         r"channels"):
        build_model(f"{NETS}:bn_variant", 2, in_channels=1)


# ---------------------------------------------------------------- interrupts


@pytest.mark.parametrize(("name", "said"), [
    ("sensitivity@x", "sensitivity@x: interrupted; it stopped before finishing (no half-written file is left): "
                      "run the stage again (or `dvc repro`)"),
    ("prune@x-0.2", "prune@x-0.2: interrupted; it stopped before finishing"),
    ("evaluate", "evaluate: interrupted; it stopped before finishing"),
    ("finetune@x-0.2", "finetune@x-0.2: interrupted; every finished epoch is saved: run the stage again (or "
                       "`dvc repro`) to resume"),
])
def test_interrupt_message_fits_the_stage(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str], name: str, said: str) -> None:
    from stages._common import stage

    monkeypatch.chdir(tmp_path)
    with pytest.raises(typer.Exit) as done, stage(name):
        raise KeyboardInterrupt
    assert done.value.exit_code == 130
    out = " ".join(capsys.readouterr().err.split())
    assert said in out, out
    assert ("epoch" in out) == name.startswith("finetune"), out


def test_yaml_is_still_plain_yaml(tmp_path: Path) -> None:
    """The repo's params file reads the same as PyYAML's own loader reads it."""
    text = (Path(__file__).resolve().parents[1] / "params.yaml").read_text()
    assert safe_load_unique(text) == yaml.safe_load(text)
