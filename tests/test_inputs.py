"""Inputs that pass validation but used to crash, mislead or silently go wrong:
each now fails fast with one line naming the input.

Each case ends in one line naming the key, path or value and what to do: exit 2 and nothing
written for a stage (run as users run it, ``python -m stages.X``, in a temp project), the
error type for a library call.  Stages stop before training; one trains 1 epoch of a tiny model.
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from PIL import Image

from slimcore.checkpoint import content_digest, load_model, read_checkpoint, safe_torch_load, save_model
from slimcore.errors import CheckpointError, DataError, ModelError, ParamsError
from slimcore.models import ModelSpec
from slimcore_pipeline import resources as checks
from slimcore_pipeline.config import load_params
from slimcore_pipeline.data import load_splits
from slimcore_pipeline.imagescan import CheckedImageFolder
from slimcore_pipeline.process import atomic_write_bytes
from tests.helpers.params import tiny_params

ROOT = Path(__file__).resolve().parents[1]
ARCH = "vgg16_bn"


def _tiny_params(**changes: Any) -> dict[str, Any]:
    return tiny_params(ARCH, {"epochs": 2, "warmup_epochs": 0, "milestones": [1], "batch_size": 32},
                       {"device": "cpu", "threads": 1, "nproc": 1}, changes)


def _project(path: Path, **changes: Any) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "params.yaml").write_text(yaml.safe_dump(_tiny_params(**changes), sort_keys=False))
    return path


def _files(project: Path) -> set[str]:
    return {str(p.relative_to(project)) for p in project.rglob("*") if p.is_file()}


def _stage(project: Path, module: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", COLUMNS="400")
    env.pop("SLIMCORE_STAGE_LOCK", None)
    return subprocess.run([sys.executable, "-m", f"stages.{module}", *args], cwd=project, env=env,
                          capture_output=True, text=True, timeout=300)


def _refused(project: Path, module: str, *args: str, expect: tuple[str, ...]) -> str:
    """Run a stage that must refuse: exit 2, one error line holding ``expect``, nothing new written
    (but the stage's lock file)."""
    before = _files(project)
    done = _stage(project, module, *args)
    out = done.stdout + done.stderr
    assert done.returncode == 2, out
    assert "Traceback" not in out, out
    assert out.count("error:") == 1, out
    # the error comes last; rich wraps it at 160 columns where stderr is not a terminal
    message = " ".join(out[out.index("error:"):].split())
    for part in expect:
        assert part in message, out
    assert "weights_only=False" not in out
    written = {f for f in _files(project) - before if not f.startswith(".slimcore/locks/")}
    assert not written, written
    return message


def _image_tree(root: Path, classes: int = 2, per_class: int = 3) -> Path:
    for split in ("train", "val"):
        for c in range(classes):
            folder = root / split / f"c{c}"
            folder.mkdir(parents=True)
            for i in range(per_class):
                Image.new("RGB", (8, 8), (40 * c, 10 * i, 0)).save(folder / f"{i}.png")
    return root


def _imagefolder_project(tmp_path: Path) -> Path:
    project = _project(tmp_path / "p", **{"data.name": "imagefolder", "data.root": "imgs",
                                          "train.batch_size": 2})
    _image_tree(project / "imgs")
    return project


# ---------------------------------------------------------------- item 4: symlink loops


def test_symlink_loop_in_imagefolder_is_refused(tmp_path: Path) -> None:
    project = _imagefolder_project(tmp_path)
    (project / "imgs" / "train" / "c1" / "loopdir").symlink_to("..")
    line = _refused(project, "baseline_train", "--arch", ARCH,
                    expect=("data.root:", "imgs/train/c1/loopdir", "a loop", "remove the link"))
    assert "baseline-train@vgg16_bn" in line


def test_symlinked_class_folder_is_followed_once(tmp_path: Path) -> None:
    root = _image_tree(tmp_path / "imgs")
    elsewhere = tmp_path / "more"
    elsewhere.mkdir()
    Image.new("RGB", (8, 8)).save(elsewhere / "x.png")
    (root / "train" / "c0" / "extra").symlink_to(elsewhere)
    assert len(CheckedImageFolder(root / "train").samples) == 7  # followed: not every link is a loop
    (root / "train" / "c1" / "again").symlink_to(elsewhere)
    with pytest.raises(DataError, match=r"already read as .*count twice"):
        CheckedImageFolder(root / "train")


# ---------------------------------------------------------------- item 5: crashes after validation


def test_seed_beyond_32_bits_is_refused(tmp_path: Path) -> None:
    project = _project(tmp_path / "p", seed=2**32)
    _refused(project, "baseline_train", "--arch", ARCH, expect=("seed", "less than or equal to 4294967295"))


def test_batch_size_larger_than_training_set(tmp_path: Path) -> None:
    project = _project(tmp_path / "p", **{"train.batch_size": 5000})
    _refused(project, "baseline_train", "--arch", ARCH,
             expect=("train.batch_size: 5000 is larger than the training set", "lower it"))


def test_image_size_beyond_memory_is_refused_before_allocating(tmp_path: Path) -> None:
    project = _project(tmp_path / "p", **{"data.image_size": 4096})  # ~470 GB of digits
    _refused(project, "baseline_train", "--arch", ARCH,
             expect=("data.image_size: 4096", "of memory", "available", "lower data.image_size"))


def test_check_memory_against_what_is_available() -> None:
    checks.check_memory(10**6, "x", "fix", available=10**9)
    with pytest.raises(checks.ResourceError, match=r"^x needs 7.5 GB of memory, 4.0 GB available: fix$"):
        checks.check_memory(7_500_000_000, "x", "fix", available=4 * 10**9)


def test_zero_byte_image_is_refused(tmp_path: Path) -> None:
    project = _imagefolder_project(tmp_path)
    (project / "imgs" / "val" / "c0" / "empty.png").write_bytes(b"")
    _refused(project, "baseline_train", "--arch", ARCH,
             expect=("imgs/val/c0/empty.png is empty (0 bytes)", "replace or remove it"))


def test_corrupt_image_names_the_file(tmp_path: Path) -> None:
    root = _image_tree(tmp_path / "imgs")
    bad = root / "train" / "c0" / "9.png"
    bad.write_bytes(b"not a png at all" * 10)
    data = CheckedImageFolder(root / "train")
    index = [p for p, _ in data.samples].index(str(bad))
    with pytest.raises(DataError, match=r"9\.png: corrupt or unreadable image \(not an image PIL can read\)"):
        data[index]


def test_error_from_a_dataloader_worker_is_one_line() -> None:
    from torch._utils import ExceptionWrapper

    from stages._common import one_line

    try:
        raise DataError("data.root: x.png: corrupt or unreadable image (y): replace or remove it")
    except DataError:
        wrapped = ExceptionWrapper(where="in DataLoader worker process 0")
    with pytest.raises(DataError) as caught:
        wrapped.reraise()
    assert "\n" in str(caught.value)
    assert one_line(caught.value) == "data.root: x.png: corrupt or unreadable image (y): replace or remove it"


@pytest.mark.parametrize("kind", ["dangling", "self"])
def test_broken_symlink_is_refused(tmp_path: Path, kind: str) -> None:
    project = _imagefolder_project(tmp_path)
    link = project / "imgs" / "train" / "c0" / "link.png"
    link.symlink_to("missing.png" if kind == "dangling" else "link.png")
    expect = "which does not exist" if kind == "dangling" else "leads back to itself"
    _refused(project, "baseline_train", "--arch", ARCH,
             expect=("imgs/train/c0/link.png is a symlink", expect, "fix or remove the link"))


def _checkpoint(path: Path, **edit: Any) -> Path:
    model = ModelSpec("torchvision", ARCH, 10, "cifar", 0.0625).build()
    save_model(path, model)
    raw = torch.load(path, weights_only=True)
    for key, value in edit.items():
        if value is None:
            del raw[key]
        else:
            raw[key] = value
    raw["digest"] = content_digest(raw)  # a hand-made file: what it says is checked, not only its bytes
    torch.save(raw, path)
    return path


@pytest.mark.parametrize("field", ["plan", "meta", "state_dict"])
def test_checkpoint_missing_a_field(tmp_path: Path, field: str) -> None:
    path = _checkpoint(tmp_path / "m.pt", **{field: None})
    with pytest.raises(CheckpointError, match=rf"m\.pt: damaged checkpoint: its '{field}' is missing; re-create"):
        read_checkpoint(path)


def test_checkpoint_plan_naming_a_bogus_module(tmp_path: Path) -> None:
    path = _checkpoint(tmp_path / "m.pt", plan=[["features.no_such", True, torch.tensor([0])]])
    with pytest.raises(CheckpointError, match=r"its pruning plan names module 'features\.no_such', which the rebuilt"):
        load_model(path)
    path = _checkpoint(tmp_path / "m.pt", plan=[["features.0"]])
    with pytest.raises(CheckpointError, match="plan entry 0 is not"):
        load_model(path)


def test_disk_full_while_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(fd: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "models" / "x.pt"
    with pytest.raises(checks.ResourceError, match=r"x\.pt: no space left on device \(nothing was written\): free"):
        atomic_write_bytes(target, b"123")
    assert list((tmp_path / "models").iterdir()) == []  # no temp file, no half file


def test_disk_space_checked_before_saving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    usage = type("Usage", (), {"free": 50 * 2**20})
    monkeypatch.setattr(checks.shutil, "disk_usage", lambda path: usage)
    checks.check_disk(tmp_path / "models", 10**6, "the checkpoint")
    with pytest.raises(checks.ResourceError, match=r"models: 52.4 MB free, the checkpoint needs about 100.0 MB"):
        checks.check_disk(tmp_path / "models", 10**8, "the checkpoint")


def test_unwritable_output_folder_is_refused_at_stage_start(tmp_path: Path) -> None:
    project = _project(tmp_path / "p")
    (project / "models").write_text("a file where the models folder should be\n")
    _refused(project, "prune", "--arch", ARCH, "--target", "0.2",
             expect=("prune@vgg16_bn-0.2", "models/vgg16_bn: cannot create it in models", "writable folder"))


def test_read_only_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise PermissionError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(checks.tempfile, "mkstemp", refuse)
    with pytest.raises(checks.ResourceError, match=r"cannot write there \(read-only file system\): make .* writable"):
        checks.check_writable(tmp_path)


# ---------------------------------------------------------------- item 6: misleading messages


def test_refused_checkpoint_never_suggests_the_unsafe_load(tmp_path: Path) -> None:
    path = tmp_path / "evil.pt"
    torch.save({"x": CheckpointError("not plain data")}, path)
    with pytest.raises(CheckpointError) as caught:
        safe_torch_load(path)
    message = str(caught.value)
    assert "holds a pickled slimcore.errors.CheckpointError object" in message
    assert "weights_only" not in message and "safe_globals" not in message and "\n" not in message
    (tmp_path / "junk.pt").write_bytes(b"garbage" * 10)
    with pytest.raises(CheckpointError, match="not a readable checkpoint") as caught:
        safe_torch_load(tmp_path / "junk.pt")
    assert "weights_only" not in str(caught.value)


def test_nan_weights_are_named_not_blamed_on_the_learning_rate(tmp_path: Path) -> None:
    project = _project(tmp_path / "p")
    model = ModelSpec("torchvision", ARCH, 10, "cifar", 0.0625).build()
    with torch.no_grad():
        model.features[0].weight[0, 0, 0, 0] = float("nan")
    save_model(project / "models" / ARCH / "sparse-0.2.pt", model)
    line = _refused(project, "prune", "--arch", ARCH, "--target", "0.2",
                    expect=("sparse-0.2.pt: features.0.weight holds NaN or inf values", "re-create or replace"))
    assert "learning rate" not in line
    with pytest.raises(ModelError):
        load_model(project / "models" / ARCH / "sparse-0.2.pt")


def test_duplicate_yaml_key_is_refused(tmp_path: Path) -> None:
    project = _project(tmp_path / "p")
    text = (project / "params.yaml").read_text().replace("train:\n", "train:\n  lr: 0.5\n", 1)
    (project / "params.yaml").write_text(text)
    line = _refused(project, "baseline_train", "--arch", ARCH,
                    expect=("params.yaml: train.lr: given twice (lines", "keep one"))
    assert "DVC refuses" in line
    with pytest.raises(ParamsError, match=r"train\.lr: given twice"):
        load_params(project / "params.yaml")


def test_epochs_by_hand_fits_the_milestones(tmp_path: Path) -> None:
    from stages._common import fit_schedule

    params = load_params(_project(tmp_path / "q", **{"train.epochs": 8, "train.milestones": [5, 7]}) / "params.yaml")
    assert fit_schedule(params, {"train.epochs": 6}) == {"train.epochs": 6, "train.milestones": [5]}
    assert fit_schedule(params, {"train.epochs": 9}) == {"train.epochs": 9}
    project = _project(tmp_path / "p", **{"train.epochs": 3, "train.milestones": [1, 2], "train.batch_size": 256})
    done = _stage(project, "baseline_train", "--arch", ARCH, "--epochs", "1")
    out = done.stdout + done.stderr
    assert done.returncode == 0, out
    assert "--epochs 1: train.milestones [1, 2] -> []" in " ".join(out.split())
    assert (project / "models" / ARCH / "baseline.pt").is_file()


def test_data_layout_still_loads(tmp_path: Path) -> None:
    root = _image_tree(tmp_path / "imgs")
    params = load_params(_project(tmp_path / "p", **{"data.name": "imagefolder", "data.root": str(root)})
                         / "params.yaml")
    splits = load_splits(params.data)
    assert len(splits.train) + len(splits.val) == 6 and len(splits.val) >= 1 and splits.num_classes == 2
    image, label = splits.train[0]
    assert image.shape == (3, 8, 8) and label == 0


def test_disk_full_in_a_library_write_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    import typer

    from stages._common import stage

    monkeypatch.chdir(tmp_path)
    with pytest.raises(typer.Exit) as done:
        with stage("sparse-train@x"):  # dvclive writing metrics.json, say
            raise OSError(errno.ENOSPC, "No space left on device", "metrics/x/sparse-train/metrics.json")
    assert done.value.exit_code == 2
    said = " ".join(capsys.readouterr().err.split())
    assert ("error: sparse-train@x: metrics/x/sparse-train/metrics.json: no space left on device: free disk "
            "space and run again") in said
    with pytest.raises(OSError, match="Connection"), stage("sparse-train@x"):  # not a user's to fix: as it was
        raise ConnectionError("Connection reset")


def test_corrupt_image_in_a_stage_is_one_line(tmp_path: Path) -> None:
    project = _imagefolder_project(tmp_path)
    for image in sorted((project / "imgs" / "train" / "c1").iterdir()):  # some land in the validation split
        image.write_bytes(b"\x89PNG truncated")
    _refused(project, "baseline_train", "--arch", ARCH,
             expect=("data.root: imgs/train/c1/", ".png: corrupt or unreadable image", "replace or remove it"))


@pytest.mark.parametrize("module", ["evaluate", "profile"])
def test_unwritable_metrics_folder_is_refused_at_stage_start(tmp_path: Path, module: str) -> None:
    project = _project(tmp_path / "p")
    (project / "metrics").write_text("a file where the metrics folder should be\n")
    _refused(project, module,
             expect=(f"error: {module}: metrics", "(not a directory)", "make metrics a writable folder"))
